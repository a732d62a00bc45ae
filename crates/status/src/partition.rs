//! Which partition of the status topic holds a tenant's records: the CRC-32 (IEEE, as
//! zlib computes it) of its source ID modulo the partition count. The publisher picks
//! the partition itself rather than leave it to the producer's configured partitioner,
//! so that `status --source-id` reads one partition whatever the producer settings say.

/// The partition of `source` among `partitions` (at least 1).
pub fn of(source: &str, partitions: i32) -> i32 {
    (crc32(source.as_bytes()) % partitions.max(1) as u32) as i32
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs_and_partitions_spread() {
        // zlib.crc32(b"123456789") == 0xCBF43926, the CRC-32 check value.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(of("anything", 1), 0);
        assert_eq!(of("anything", 0), 0);
        let mut seen = [0; 6];
        for n in 0..600 {
            seen[of(&format!("src_{n}"), 6) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
    }
}

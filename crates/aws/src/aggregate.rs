//! KPL record aggregation: several user records in one Kinesis record, in the format the
//! Kinesis Producer Library writes and KCL, Firehose and AWS's deaggregation modules
//! read: four magic bytes, a protobuf `AggregatedRecord`, the MD5 of that protobuf.
//!
//! ```text
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! ```
//!
//! Only what this worker needs is written: the records of one user, so one partition
//! key (index 0), no explicit hash keys, no tags.

/// The first bytes of an aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Bytes an aggregate adds to the user records it holds, at most: magic, digest, the
/// partition key's table entry (tag and length), and per record its tags, lengths and
/// key index. For sizing groups before they are encoded.
pub fn max_overhead(partition_key: &str, records: usize) -> usize {
    MAGIC.len() + 16 + 1 + 10 + partition_key.len() + records * PER_RECORD_OVERHEAD
}

/// Most bytes a record's framing takes in an aggregate (record tag and length, key index
/// field, data tag and length).
pub const PER_RECORD_OVERHEAD: usize = 1 + 10 + 2 + 1 + 10;

/// The records, in order, as one aggregated record with `partition_key`.
pub fn aggregate(partition_key: &str, records: &[&[u8]]) -> Vec<u8> {
    let body_len: usize = records.iter().map(|d| record_len(d.len())).sum::<usize>()
        + 1
        + varint_len(partition_key.len() as u64)
        + partition_key.len();
    let mut out = Vec::with_capacity(MAGIC.len() + body_len + 16);
    out.extend_from_slice(&MAGIC);
    // partition_key_table: field 1, length-delimited.
    out.push(1 << 3 | 2);
    push_varint(&mut out, partition_key.len() as u64);
    out.extend_from_slice(partition_key.as_bytes());
    for data in records {
        // records: field 3, length-delimited.
        out.push(3 << 3 | 2);
        push_varint(&mut out, inner_len(data.len()) as u64);
        // partition_key_index: field 1, varint 0.
        out.extend_from_slice(&[1 << 3, 0]);
        // data: field 3, length-delimited.
        out.push(3 << 3 | 2);
        push_varint(&mut out, data.len() as u64);
        out.extend_from_slice(data);
    }
    let digest = md5::compute(&out[MAGIC.len()..]);
    out.extend_from_slice(&digest.0);
    out
}

/// A `Record` message's own length for `data_len` bytes of data.
fn inner_len(data_len: usize) -> usize {
    2 + 1 + varint_len(data_len as u64) + data_len
}

/// A `Record`'s length in the aggregate, with its tag and length prefix.
fn record_len(data_len: usize) -> usize {
    let inner = inner_len(data_len);
    1 + varint_len(inner as u64) + inner
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7F) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_records_encode_as_the_kpl_writes_them() {
        let out = aggregate("k", &[b"ab", b""]);
        let body: &[u8] = &[
            0x0A, 1, b'k', // partition_key_table: "k"
            0x1A, 6, 0x08, 0, 0x1A, 2, b'a', b'b', // record: key 0, data "ab"
            0x1A, 4, 0x08, 0, 0x1A, 0, // record: key 0, no data
        ];
        assert_eq!(&out[..4], &MAGIC);
        assert_eq!(&out[4..out.len() - 16], body);
        assert_eq!(&out[out.len() - 16..], &md5::compute(body).0);
    }

    #[test]
    fn lengths_over_127_bytes_take_more_varint_bytes_and_stay_within_the_overhead() {
        let big = vec![7u8; 300];
        let key = "user-1";
        let records: Vec<&[u8]> = vec![&big, b"x", &big];
        let out = aggregate(key, &records);
        // The first record: tag, length 305 (two bytes), key index, tag, length 300.
        let at = 4 + 2 + key.len();
        assert_eq!(&out[at..at + 3], &[0x1A, 0xB1, 0x02]);
        assert_eq!(&out[at + 3..at + 8], &[0x08, 0, 0x1A, 0xAC, 0x02]);
        let data: usize = records.iter().map(|r| r.len()).sum();
        assert!(out.len() <= data + max_overhead(key, records.len()));
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(1 << 20), 3);
    }
}

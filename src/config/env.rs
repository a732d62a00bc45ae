//! Environment overrides: `KINESIS_DESTINATION__SECTION__KEY=value` sets any key, read
//! as the type the key has in the configuration.

use super::{ConfigError, ENV_PREFIX};

/// Sets one `KINESIS_DESTINATION__SECTION__KEY` override. The value is read as the type
/// the key has (number, bool, list as TOML or comma-separated); unknown keys (such as
/// librdkafka's) as strings.
pub(super) fn apply_override(
    root: &mut toml::Table,
    shape: &toml::Table,
    name: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let key = path.join(".");
    if path.iter().any(String::is_empty) {
        return Err(ConfigError::new(name, "malformed override name"));
    }
    let expected = lookup(shape, &path);
    let value = match expected {
        Some(toml::Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| ConfigError::new(&key, format!("{name} must be a whole number")))?,
        Some(toml::Value::Float(_)) => raw
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| ConfigError::new(&key, format!("{name} must be a number")))?,
        Some(toml::Value::Boolean(_)) => raw
            .trim()
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| ConfigError::new(&key, format!("{name} must be true or false")))?,
        Some(toml::Value::Array(_)) => {
            match toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
            {
                Some(v @ toml::Value::Array(_)) => v,
                _ => toml::Value::Array(
                    raw.split(',')
                        .map(|s| toml::Value::String(s.trim().to_owned()))
                        .collect(),
                ),
            }
        }
        _ => toml::Value::String(raw.to_owned()),
    };
    let (last, parents) = path.split_last().expect("path has at least one segment");
    let mut table = root;
    for seg in parents {
        let entry = table
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::new(&key, format!("{seg} is not a section")))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

fn lookup<'a>(shape: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = shape;
    for seg in parents {
        t = t.get(seg)?.as_table()?;
    }
    t.get(last)
}

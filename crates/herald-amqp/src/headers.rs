use lapin::types::{AMQPValue, FieldTable};

/// A string header, whichever AMQP string type the producer used.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A copy of `headers` without the entries `drop` names (e.g. dead-letter headers on replay).
pub fn headers_without(headers: Option<&FieldTable>, drop: impl Fn(&str) -> bool) -> FieldTable {
    headers
        .map(|table| {
            table
                .inner()
                .iter()
                .filter(|(name, _)| !drop(name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into()
        })
        .unwrap_or_default()
}

/// A signed integer header (timestamps in milliseconds), whichever integer type the producer used.
pub fn header_i64(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    match headers?.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// An unsigned integer header, whichever integer type (or decimal string) the producer used.
pub fn header_u32(headers: Option<&FieldTable>, name: &str) -> Option<u32> {
    let value = headers?.inner().get(name)?;
    let wide: i64 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        _ => return None,
    };
    u32::try_from(wide).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_headers_of_any_integer_or_string_type() {
        let mut table = FieldTable::default();
        table.insert("a".into(), AMQPValue::LongLongInt(3));
        table.insert("b".into(), AMQPValue::ShortString("7".into()));
        table.insert("c".into(), AMQPValue::LongString("text".into()));
        table.insert("d".into(), AMQPValue::LongInt(-1));
        assert_eq!(header_u32(Some(&table), "a"), Some(3));
        assert_eq!(header_u32(Some(&table), "b"), Some(7));
        assert_eq!(header_u32(Some(&table), "d"), None);
        assert_eq!(header_str(Some(&table), "c"), Some("text"));
        assert_eq!(header_str(Some(&table), "missing"), None);
        assert_eq!(header_str(None, "c"), None);
        assert_eq!(header_i64(Some(&table), "d"), Some(-1));
        let trimmed = headers_without(Some(&table), |name| name == "a");
        assert!(!trimmed.contains_key("a"));
        assert!(trimmed.contains_key("b"));
    }
}

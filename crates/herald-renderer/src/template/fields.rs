//! WeChat's typed data fields (subscribe messages, and template messages of the typed kind):
//! the key names the type (`thing1`, `time2`, `character_string3`), and each type limits what
//! its value may hold. WeChat answers a violation with 47003 at send time; checking here turns
//! it into a rejection that names the field before anything is sent.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

/// The value types of WeChat's typed data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Thing,
    Number,
    Letter,
    Symbol,
    CharacterString,
    Time,
    Date,
    Amount,
    PhoneNumber,
    CarNumber,
    Name,
    Phrase,
}

const TYPES: &[(&str, FieldType)] = &[
    ("thing", FieldType::Thing),
    ("number", FieldType::Number),
    ("letter", FieldType::Letter),
    ("symbol", FieldType::Symbol),
    ("character_string", FieldType::CharacterString),
    ("time", FieldType::Time),
    ("date", FieldType::Date),
    ("amount", FieldType::Amount),
    ("phone_number", FieldType::PhoneNumber),
    ("car_number", FieldType::CarNumber),
    ("name", FieldType::Name),
    ("phrase", FieldType::Phrase),
];

/// The type of a data key such as `thing1` (a type name followed by digits).
pub fn type_of_key(key: &str) -> Option<FieldType> {
    let stem = key.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() == key.len() {
        return None;
    }
    TYPES
        .iter()
        .find(|(name, _)| *name == stem)
        .map(|(_, kind)| *kind)
}

/// The type names, for error messages.
pub fn type_names() -> String {
    TYPES
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_cjk(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{F900}'..='\u{FAFF}')
}

fn is_symbol(c: char) -> bool {
    !c.is_alphanumeric() && !c.is_whitespace()
}

fn is_decimal(text: &str) -> bool {
    let text = text.strip_prefix('-').unwrap_or(text);
    let mut parts = text.splitn(2, '.');
    let whole = parts.next().unwrap_or_default();
    let fraction = parts.next();
    !whole.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && fraction.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
}

const DATE_FORMATS: &[&str] = &["%Y年%m月%d日", "%Y-%m-%d", "%Y/%m/%d"];
const TIME_FORMATS: &[&str] = &["%H:%M", "%H:%M:%S"];

fn parses_as_date(text: &str) -> bool {
    DATE_FORMATS
        .iter()
        .any(|f| NaiveDate::parse_from_str(text, f).is_ok())
}

fn parses_as_time(text: &str) -> bool {
    TIME_FORMATS
        .iter()
        .any(|f| NaiveTime::parse_from_str(text, f).is_ok())
}

fn parses_as_date_time(text: &str) -> bool {
    DATE_FORMATS.iter().any(|d| {
        TIME_FORMATS.iter().any(|t| {
            [format!("{d} {t}"), format!("{d}{t}")]
                .iter()
                .any(|f| NaiveDateTime::parse_from_str(text, f).is_ok())
        })
    })
}

/// Checks a rendered value against its type; the error says what is wrong.
pub fn check(kind: FieldType, value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if value.trim().is_empty() {
        return Err("is empty; WeChat rejects empty values".into());
    }
    let too_long = |max: usize, what: &str| -> Result<(), String> {
        if chars > max {
            Err(format!(
                "`{value}` is {chars} characters; a {what} value allows at most {max}"
            ))
        } else {
            Ok(())
        }
    };
    let only = |ok: bool, what: &str| -> Result<(), String> {
        if ok {
            Ok(())
        } else {
            Err(format!("`{value}` is not {what}"))
        }
    };
    match kind {
        FieldType::Thing => too_long(20, "thing"),
        FieldType::Number => {
            too_long(32, "number")?;
            only(
                is_decimal(value),
                "a number (digits, optionally with a decimal point)",
            )
        }
        FieldType::Letter => {
            too_long(32, "letter")?;
            only(
                value.chars().all(|c| c.is_ascii_alphabetic()),
                "letters only",
            )
        }
        FieldType::Symbol => {
            too_long(5, "symbol")?;
            only(value.chars().all(is_symbol), "symbols only")
        }
        FieldType::CharacterString => {
            too_long(32, "character_string")?;
            only(
                value.chars().all(|c| c.is_ascii_graphic()),
                "letters, digits and symbols only",
            )
        }
        FieldType::Time => only(
            parses_as_time(value) || parses_as_date_time(value),
            "a 24-hour time such as 15:01 or 2019年10月1日 15:01",
        ),
        FieldType::Date => only(
            parses_as_date(value) || parses_as_date_time(value),
            "a date such as 2019年10月1日 or 2019年10月1日 15:01",
        ),
        FieldType::Amount => {
            // One currency sign, then a number of at most 10 digits; `元` may close it.
            let body = value.strip_suffix('元').unwrap_or(value);
            let body = body
                .strip_prefix(|c: char| "¥￥$€£".contains(c))
                .unwrap_or(body);
            let digits = body.chars().filter(char::is_ascii_digit).count();
            only(
                is_decimal(body) && digits <= 10,
                "an amount: a currency sign and at most 10 digits, such as ¥100.00",
            )
        }
        FieldType::PhoneNumber => {
            too_long(17, "phone_number")?;
            only(
                value
                    .chars()
                    .all(|c| c.is_ascii_digit() || "+-() ".contains(c)),
                "a phone number (digits and + - ( ) only)",
            )
        }
        FieldType::CarNumber => too_long(8, "car_number"),
        FieldType::Name => {
            if value.is_ascii() {
                too_long(20, "Latin name")
            } else {
                too_long(10, "Chinese name")
            }
        }
        FieldType::Phrase => {
            too_long(5, "phrase")?;
            only(value.chars().all(is_cjk), "Chinese characters only")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_type() {
        assert_eq!(type_of_key("thing1"), Some(FieldType::Thing));
        assert_eq!(
            type_of_key("character_string12"),
            Some(FieldType::CharacterString)
        );
        assert_eq!(type_of_key("thing"), None);
        assert_eq!(type_of_key("order_id"), None);
        assert_eq!(type_of_key("keyword1"), None);
    }

    #[test]
    fn limits_follow_wechat() {
        use FieldType::*;
        assert!(check(Thing, &"物".repeat(20)).is_ok());
        assert!(check(Thing, &"物".repeat(21)).is_err());
        assert!(check(Number, "12.50").is_ok());
        assert!(check(Number, "12a").is_err());
        assert!(check(Letter, "abc").is_ok());
        assert!(check(Letter, "ab1").is_err());
        assert!(check(Symbol, "%%").is_ok());
        assert!(check(Symbol, "%%%%%%").is_err());
        assert!(check(CharacterString, "A-1001").is_ok());
        assert!(check(CharacterString, &"x".repeat(33)).is_err());
        assert!(check(Time, "15:01").is_ok());
        assert!(check(Time, "2019年10月1日 15:01").is_ok());
        assert!(check(Time, "tomorrow").is_err());
        assert!(check(Date, "2019年10月1日").is_ok());
        assert!(check(Date, "2019-10-01 15:01").is_ok());
        assert!(check(Date, "soon").is_err());
        assert!(check(Amount, "¥100.00").is_ok());
        assert!(check(Amount, "100元").is_ok());
        assert!(check(Amount, "¥12345678901").is_err());
        assert!(check(PhoneNumber, "+86 138-0000-0000").is_ok());
        assert!(check(PhoneNumber, &"1".repeat(18)).is_err());
        assert!(check(CarNumber, "粤A12345").is_ok());
        assert!(check(CarNumber, "粤A1234567").is_err());
        assert!(check(Name, "张三").is_ok());
        assert!(check(Name, &"张".repeat(11)).is_err());
        assert!(check(Name, &"a".repeat(20)).is_ok());
        assert!(check(Phrase, "已发货").is_ok());
        assert!(check(Phrase, "已经发货了吗").is_err());
        assert!(check(Phrase, "sent").is_err());
        assert!(check(Thing, " ").is_err());
    }
}

//! containerd's filter syntax, as used by `List` (and `ctr snapshots ls`-style tools).
//!
//! Supported: `FIELD` (present and non-empty), `FIELD==VALUE`, `FIELD!=VALUE`,
//! `FIELD~=REGEX`; selectors joined by `,` must all match; alternatives joined by `|`
//! (and separate filter strings) need any to match. Fields: `name`, `parent`, `kind`
//! (`active`, `view`, `committed`) and `labels.KEY`; a field path component or value may
//! be double-quoted with Go-style escapes (`labels."containerd.io/snapshot.ref"`), and a
//! regex may also be written `/.../`.

use regex::Regex;

use super::Info;

/// A filter string that does not follow containerd's syntax.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{reason} at byte {position} of {filter:?}")]
pub struct FilterError {
    pub filter: String,
    pub position: usize,
    pub reason: String,
}

#[derive(Debug, Clone)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    operator: Operator,
}

/// A parsed filter: any of its alternatives, each a conjunction of selectors.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    alternatives: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses several filter strings, any of which may match (containerd's `ParseAll`).
    /// No strings means everything matches.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Self, FilterError> {
        let mut alternatives = Vec::new();
        for filter in filters {
            alternatives.extend(Parser::new(filter.as_ref()).parse()?);
        }
        Ok(Self { alternatives })
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|selectors| selectors.iter().all(|selector| selector.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        match &self.operator {
            Operator::Present => value.is_some_and(|v| !v.is_empty()),
            Operator::Equal(expected) => value == Some(expected.as_str()),
            Operator::NotEqual(expected) => value != Some(expected.as_str()),
            Operator::Matches(regex) => value.is_some_and(|v| regex.is_match(v)),
        }
    }
}

fn field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path {
        [name] if name == "name" => Some(&info.name),
        [name] if name == "parent" => Some(&info.parent),
        [name] if name == "kind" => Some(info.kind.as_str()),
        [labels, rest @ ..] if labels == "labels" && !rest.is_empty() => {
            // A label key may itself contain dots when written unquoted.
            info.labels.get(&rest.join(".")).map(String::as_str)
        }
        _ => None,
    }
}

struct Parser<'a> {
    text: &'a str,
    position: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, position: 0 }
    }

    fn error(&self, reason: impl Into<String>) -> FilterError {
        FilterError {
            filter: self.text.to_owned(),
            position: self.position,
            reason: reason.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.position..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.position = self.text.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(token) {
            self.position += token.len();
            true
        } else {
            false
        }
    }

    fn parse(mut self) -> Result<Vec<Vec<Selector>>, FilterError> {
        let mut alternatives = vec![vec![self.selector()?]];
        loop {
            self.skip_space();
            if self.rest().is_empty() {
                return Ok(alternatives);
            }
            if self.eat(",") {
                let selector = self.selector()?;
                alternatives
                    .last_mut()
                    .unwrap_or_else(|| unreachable!())
                    .push(selector);
            } else if self.eat("|") {
                alternatives.push(vec![self.selector()?]);
            } else {
                return Err(self.error("expected `,` or `|`"));
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        while self.eat(".") {
            path.push(self.field()?);
        }
        let operator = if self.eat("==") {
            Operator::Equal(self.value()?)
        } else if self.eat("!=") {
            Operator::NotEqual(self.value()?)
        } else if self.eat("~=") {
            let start = self.position;
            let pattern = self.value()?;
            Operator::Matches(Regex::new(&pattern).map_err(|error| FilterError {
                filter: self.text.to_owned(),
                position: start,
                reason: format!("invalid regular expression: {error}"),
            })?)
        } else {
            Operator::Present
        };
        Ok(Selector { path, operator })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        if self.rest().starts_with('"') {
            return self.quoted('"');
        }
        let length = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/'))
            .unwrap_or(self.rest().len());
        if length == 0 {
            return Err(self.error("expected a field name"));
        }
        let name = self.rest()[..length].to_owned();
        self.position += length;
        Ok(name)
    }

    fn value(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        match self.rest().chars().next() {
            Some(quote @ ('"' | '/')) => self.quoted(quote),
            _ => {
                let length = self
                    .rest()
                    .find(|c: char| c == ',' || c == '|' || c.is_whitespace())
                    .unwrap_or(self.rest().len());
                if length == 0 {
                    return Err(self.error("expected a value"));
                }
                let value = self.rest()[..length].to_owned();
                self.position += length;
                Ok(value)
            }
        }
    }

    /// A string between `quote`s with backslash escapes (`\"`, `\\`, `\n`, `\t`, `\/`).
    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let start = self.position;
        let mut chars = self.rest().char_indices().skip(1);
        let mut value = String::new();
        while let Some((offset, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.position += offset + c.len_utf8();
                    return Ok(value);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 't')) => value.push('\t'),
                    Some((_, escaped)) if quote == '/' && escaped != '/' => {
                        // Inside a regex, keep escapes for the regex engine.
                        value.push('\\');
                        value.push(escaped);
                    }
                    Some((_, escaped)) => value.push(escaped),
                    None => break,
                },
                c => value.push(c),
            }
        }
        self.position = start;
        Err(self.error(format!("unterminated {quote}...{quote}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::super::{Kind, Labels};
    use super::*;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.to_owned(),
            parent: parent.to_owned(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn matches(filter: &str, info: &Info) -> bool {
        Filter::parse_all(&[filter]).unwrap().matches(info)
    }

    #[test]
    fn fields_and_operators() {
        let layer = info(
            "default/3/sha256:abc",
            "default/2/sha256:def",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", "sha256:abc"), ("team", "a")],
        );
        assert!(matches("name==default/3/sha256:abc", &layer));
        assert!(matches("kind==committed", &layer));
        assert!(!matches("kind==active", &layer));
        assert!(matches("kind!=active", &layer));
        assert!(matches(r#"parent=="default/2/sha256:def""#, &layer));
        assert!(matches(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc"#,
            &layer
        ));
        assert!(matches("labels.team", &layer));
        assert!(!matches("labels.nope", &layer));
        assert!(matches("labels.team~=^a$", &layer));
        assert!(matches("name~=/sha256:[a-f]+$/", &layer));
        assert!(!matches("labels.team!=a", &layer));
    }

    #[test]
    fn and_or() {
        let layer = info("n", "", Kind::Active, &[("x", "1")]);
        assert!(matches("kind==active,labels.x==1", &layer));
        assert!(!matches("kind==active,labels.x==2", &layer));
        assert!(matches("kind==view|labels.x==1", &layer));
        assert!(!matches("kind==view|labels.x==2", &layer));
        assert!(matches("name==n , kind==active", &layer));
        let either = Filter::parse_all(&["kind==view", "name==n"]).unwrap();
        assert!(either.matches(&layer));
        assert!(Filter::parse_all::<&str>(&[]).unwrap().matches(&layer));
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "",
            "name==",
            "name==\"open",
            "==x",
            "name==a b",
            "labels.x~=(",
            "name==a,",
        ] {
            assert!(
                Filter::parse_all(&[bad]).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}

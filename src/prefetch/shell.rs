//! Enough of the POSIX shell language to find the commands of a `sh -c` string:
//! quoting, parameter expansion from the image's environment, command separators
//! and redirections. Anything that needs running code (command substitution,
//! arithmetic) makes the affected word unknown.

/// One word after quote removal and expansion; `None` when it needs a run to know.
pub(crate) type Word = Option<String>;

/// A simple command: its words (assignments, keywords and builtins included; the
/// caller interprets them) and its source text for diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShellCommand {
    pub words: Vec<Word>,
    pub text: String,
}

struct Parser<'a> {
    chars: Vec<char>,
    at: usize,
    lookup: &'a dyn Fn(&str) -> Option<String>,
    positional: &'a [String],
    commands: Vec<ShellCommand>,
    words: Vec<Word>,
    command_start: usize,
    word: String,
    in_word: bool,
    unknown: bool,
    /// The word is exactly `$@` (or `"$@"`): it expands to the positional parameters.
    splice_all: bool,
    /// An unquoted expansion produced whitespace: the word is split into fields.
    split: bool,
    /// The next word is a redirection target, not an argument.
    redirect_target: bool,
}

/// Splits `script` into simple commands. `lookup` answers `$NAME`; `positional` are
/// `$0`, `$1`, ... (for `sh -c SCRIPT ARG0 ARG1...`).
pub(crate) fn parse_commands(
    script: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    positional: &[String],
) -> Vec<ShellCommand> {
    let mut parser = Parser {
        chars: script.chars().collect(),
        at: 0,
        lookup,
        positional,
        commands: Vec::new(),
        words: Vec::new(),
        command_start: 0,
        word: String::new(),
        in_word: false,
        unknown: false,
        splice_all: false,
        split: false,
        redirect_target: false,
    };
    parser.run();
    parser.commands
}

impl Parser<'_> {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.at + ahead).copied()
    }

    fn run(&mut self) {
        while let Some(c) = self.peek(0) {
            match c {
                ' ' | '\t' => {
                    self.finish_word();
                    self.at += 1;
                }
                '\n' | ';' | '&' | '|' | '(' | ')' => {
                    if c == '&' && !self.in_word && self.peek(1) == Some('>') {
                        // `&>file` (bash): redirect both streams.
                        self.at += 2;
                        self.finish_word();
                        self.redirect_target = true;
                        continue;
                    }
                    self.finish_command();
                    self.at += 1;
                    while matches!(self.peek(0), Some('&' | '|' | ';')) {
                        self.at += 1;
                    }
                    self.command_start = self.at;
                }
                '#' if !self.in_word => {
                    while self.peek(0).is_some_and(|c| c != '\n') {
                        self.at += 1;
                    }
                }
                '<' | '>' => self.redirection(),
                '\'' => {
                    self.in_word = true;
                    self.at += 1;
                    while let Some(c) = self.peek(0) {
                        self.at += 1;
                        if c == '\'' {
                            break;
                        }
                        self.word.push(c);
                    }
                }
                '"' => self.double_quoted(),
                '\\' => {
                    self.at += 1;
                    match self.peek(0) {
                        Some('\n') => self.at += 1,
                        Some(c) => {
                            self.in_word = true;
                            self.word.push(c);
                            self.at += 1;
                        }
                        None => {}
                    }
                }
                '$' => {
                    self.in_word = true;
                    self.expansion(false);
                }
                '`' => self.backquoted(),
                c => {
                    self.in_word = true;
                    self.word.push(c);
                    self.at += 1;
                }
            }
        }
        self.finish_command();
    }

    fn redirection(&mut self) {
        // A word of digits right before the operator is its file descriptor (`2>`).
        if self.in_word && !self.word.is_empty() && self.word.chars().all(|c| c.is_ascii_digit()) {
            self.word.clear();
            self.in_word = false;
        } else {
            self.finish_word();
        }
        while matches!(self.peek(0), Some('<' | '>' | '|')) {
            self.at += 1;
        }
        if self.peek(0) == Some('&') {
            // `>&2`, `2>&1`, `<&-`: duplicates a descriptor, no file.
            self.at += 1;
            while self.peek(0).is_some_and(|c| c.is_ascii_digit() || c == '-') {
                self.at += 1;
            }
            return;
        }
        self.redirect_target = true;
    }

    fn double_quoted(&mut self) {
        self.in_word = true;
        self.at += 1;
        while let Some(c) = self.peek(0) {
            match c {
                '"' => {
                    self.at += 1;
                    return;
                }
                '\\' => {
                    match self.peek(1) {
                        Some(next @ ('$' | '`' | '"' | '\\')) => self.word.push(next),
                        Some('\n') => {}
                        Some(next) => {
                            self.word.push('\\');
                            self.word.push(next);
                        }
                        None => {}
                    }
                    self.at += 2;
                }
                '$' => self.expansion(true),
                '`' => self.backquoted(),
                c => {
                    self.word.push(c);
                    self.at += 1;
                }
            }
        }
    }

    fn backquoted(&mut self) {
        self.in_word = true;
        self.unknown = true;
        self.at += 1;
        while let Some(c) = self.peek(0) {
            self.at += 1;
            if c == '\\' {
                self.at += 1;
            } else if c == '`' {
                break;
            }
        }
    }

    /// At a `$`: expands a parameter, or marks the word unknown.
    fn expansion(&mut self, quoted: bool) {
        self.at += 1;
        let value = match self.peek(0) {
            Some('(') => {
                self.unknown = true;
                let mut depth = 0;
                while let Some(c) = self.peek(0) {
                    self.at += 1;
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                return;
            }
            Some('{') => {
                self.at += 1;
                let mut inner = String::new();
                while let Some(c) = self.peek(0) {
                    self.at += 1;
                    if c == '}' {
                        break;
                    }
                    inner.push(c);
                }
                self.braced(&inner)
            }
            Some('@' | '*') => {
                self.at += 1;
                let whole_word = self.word.is_empty()
                    && matches!(self.peek(0), None | Some(' ' | '\t' | '\n' | ';' | '"'));
                if whole_word {
                    self.splice_all = true;
                    return;
                }
                Some(self.positional.get(1..).unwrap_or_default().join(" "))
            }
            Some(digit) if digit.is_ascii_digit() => {
                self.at += 1;
                let index = digit.to_digit(10).unwrap_or(0) as usize;
                Some(self.positional.get(index).cloned().unwrap_or_default())
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let mut name = String::new();
                while let Some(c) = self
                    .peek(0)
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    name.push(c);
                    self.at += 1;
                }
                Some((self.lookup)(&name).unwrap_or_default())
            }
            // `$$`, `$?`, `$#`, `$!`, `$-`: only known at run time.
            Some('$' | '?' | '#' | '!' | '-') => {
                self.at += 1;
                None
            }
            // A lone `$` is literal.
            _ => Some("$".to_owned()),
        };
        match value {
            Some(value) => {
                if !quoted && value.contains([' ', '\t', '\n']) {
                    self.split = true;
                }
                self.word.push_str(&value);
            }
            None => self.unknown = true,
        }
    }

    /// `${NAME}`, `${NAME:-default}`, `${NAME-default}`; other operators are unknown.
    fn braced(&self, inner: &str) -> Option<String> {
        let name_end = inner
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(inner.len());
        let (name, op) = inner.split_at(name_end);
        let value = if let Ok(index) = name.parse::<usize>() {
            self.positional.get(index).cloned()
        } else {
            (self.lookup)(name)
        };
        if op.is_empty() {
            return Some(value.unwrap_or_default());
        }
        if let Some(default) = op.strip_prefix(":-") {
            return Some(
                value
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| default.to_owned()),
            );
        }
        if let Some(default) = op.strip_prefix('-') {
            return Some(value.unwrap_or_else(|| default.to_owned()));
        }
        None
    }

    fn finish_word(&mut self) {
        if self.in_word || self.splice_all {
            let word = std::mem::take(&mut self.word);
            if self.redirect_target {
                self.redirect_target = false;
            } else if self.splice_all {
                self.words
                    .extend(self.positional.iter().skip(1).map(|arg| Some(arg.clone())));
            } else if self.unknown {
                self.words.push(None);
            } else if self.split {
                self.words
                    .extend(word.split_whitespace().map(|field| Some(field.to_owned())));
            } else {
                self.words.push(Some(word));
            }
        }
        self.in_word = false;
        self.unknown = false;
        self.splice_all = false;
        self.split = false;
    }

    fn finish_command(&mut self) {
        self.finish_word();
        self.redirect_target = false;
        if !self.words.is_empty() {
            let end = self.at.min(self.chars.len());
            let text: String = self.chars[self.command_start.min(end)..end]
                .iter()
                .collect();
            self.commands.push(ShellCommand {
                words: std::mem::take(&mut self.words),
                text: text.trim().to_owned(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(script: &str) -> Vec<Vec<Word>> {
        let env = |name: &str| match name {
            "APP" => Some("/srv/app".to_owned()),
            "OPTS" => Some("-u -B".to_owned()),
            _ => None,
        };
        let positional = ["sh".to_owned(), "a1".to_owned(), "a 2".to_owned()];
        parse_commands(script, &env, &positional)
            .into_iter()
            .map(|c| c.words)
            .collect()
    }

    fn w(items: &[&str]) -> Vec<Word> {
        items.iter().map(|s| Some((*s).to_owned())).collect()
    }

    #[test]
    fn splits_commands_and_removes_quotes() {
        assert_eq!(
            words("cd $APP && exec python3 'main app.py' \"--name=$APP\"; echo done"),
            vec![
                w(&["cd", "/srv/app"]),
                w(&["exec", "python3", "main app.py", "--name=/srv/app"]),
                w(&["echo", "done"]),
            ]
        );
    }

    #[test]
    fn drops_redirections_and_comments() {
        assert_eq!(
            words("nginx -g 'daemon off;' > /var/log/x 2>&1 # run it\n/bin/true"),
            vec![w(&["nginx", "-g", "daemon off;"]), w(&["/bin/true"])]
        );
        assert_eq!(words("cmd 2> err <in"), vec![w(&["cmd"])]);
    }

    #[test]
    fn expands_positional_defaults_and_splits_unquoted_values() {
        assert_eq!(words("exec \"$@\""), vec![w(&["exec", "a1", "a 2"])]);
        assert_eq!(
            words("x ${NOPE:-/def} ${APP}"),
            vec![w(&["x", "/def", "/srv/app"])]
        );
        assert_eq!(
            words("python3 $OPTS x"),
            vec![w(&["python3", "-u", "-B", "x"])]
        );
        assert_eq!(words("echo $1"), vec![w(&["echo", "a1"])]);
    }

    #[test]
    fn command_substitution_makes_words_unknown() {
        assert_eq!(
            words("$(which python) app.py `date`"),
            vec![vec![None, Some("app.py".to_owned()), None]]
        );
    }

    /// Unbalanced quotes, brackets and expansions, with multi-byte characters.
    #[test]
    fn arbitrary_text_never_panics() {
        let alphabet: Vec<char> = "ab_ .,;:()[]{}'\"\\#$@*`\n\t=<>&|-é€import from def try except"
            .chars()
            .collect();
        let mut seed: u64 = 42;
        for length in 0..400usize {
            let text: String = (0..length)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            let _ = parse_commands(&text, &|_| Some("v a".to_owned()), &[]);
        }
    }
}

//! CPython, statically: the interpreter's `sys.path`, what every start imports, and
//! the import graph of the script, resolved to the files the import system reads.

use std::collections::{HashMap, HashSet, VecDeque};

use super::analyze::{Analyzer, Env};
use super::elf;
use super::view::{FileInfo, resolve};
use super::{ImagePath, ModuleFile, PrefetchError, PrefetchKind, Reason, Warning};

/// How far the import graph is followed from the script.
const MAX_IMPORT_DEPTH: usize = 8;
/// Module files added for one interpreter start.
const MAX_MODULE_FILES: usize = 2000;
/// Source read to find imports; bigger modules are cut (their imports are at the top).
const MAX_SOURCE_BYTES: usize = 4 * 1024 * 1024;
const MAX_PTH_BYTES: usize = 64 * 1024;
/// Missing module names listed in the warning.
const MAX_REPORTED_MISSING: usize = 40;
/// Locale archives bigger than this are left out: a start reads a small part of them.
const MAX_LOCALE_ARCHIVE_BYTES: u64 = 16 * 1024 * 1024;

/// Imported at every start (besides frozen modules): the codec machinery.
const STARTUP_MODULES: &[&str] = &["encodings", "encodings.aliases", "encodings.utf_8"];
/// Imported at start by Pythons before 3.11, which read them from disk.
const UNFROZEN_STARTUP_MODULES: &[&str] = &[
    "abc",
    "codecs",
    "io",
    "site",
    "os",
    "stat",
    "posixpath",
    "genericpath",
    "_collections_abc",
    "_sitebuiltins",
];
/// Frozen into the interpreter since 3.11: imported without reading any file.
/// Compiled into every CPython build (`Modules/Setup.bootstrap`): never files.
const ALWAYS_BUILTIN: &[&str] = &[
    "sys",
    "builtins",
    "_imp",
    "_io",
    "_warnings",
    "marshal",
    "gc",
    "posix",
    "errno",
    "pwd",
    "_sre",
    "_codecs",
    "_weakref",
    "_functools",
    "_operator",
    "_collections",
    "_abc",
    "itertools",
    "atexit",
    "_signal",
    "_stat",
    "time",
    "_thread",
    "_locale",
    "faulthandler",
    "_tracemalloc",
    "_symtable",
    "_string",
];
/// Modules C extensions import from their init code, which no source shows.
const EXTENSION_IMPORTS: &[(&str, &[&str])] = &[
    ("_decimal", &["collections", "numbers"]),
    ("_pickle", &["copyreg", "_compat_pickle"]),
    ("_elementtree", &["copy", "xml.etree.ElementPath"]),
    ("_datetime", &["time"]),
];
const FROZEN_SINCE_3_11: &[&str] = &[
    "abc",
    "codecs",
    "io",
    "_collections_abc",
    "_sitebuiltins",
    "genericpath",
    "ntpath",
    "posixpath",
    "os",
    "os.path",
    "site",
    "stat",
    "importlib.util",
    "importlib.machinery",
    "runpy",
    "importlib._bootstrap",
    "importlib._bootstrap_external",
    "zipimport",
];

/// One import statement (or `__import__("x")` call) found in a module's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Import {
    /// Dotted name after the dots; empty for `from . import x`.
    pub module: String,
    /// Leading dots of a relative import.
    pub level: usize,
    /// Names after `from ... import`; they may be submodules.
    pub names: Vec<String>,
    pub guard: ImportGuard,
}

/// How an import is guarded by `try:` / `except ImportError:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImportGuard {
    Unguarded,
    /// In the body of `try` block number N of the module.
    Try(usize),
    /// In `except ImportError:` of `try` block N: runs only when that block's import fails.
    Fallback(usize),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Str(String),
    Op(char),
}

/// A logical line: tokens, with bracket depth, and its indentation.
struct LogicalLine {
    indent: usize,
    tokens: Vec<(Token, usize)>,
}

/// Splits Python source into logical lines of tokens, skipping comments and string
/// contents (an `import` inside a string is not an import).
fn logical_lines(source: &str) -> Vec<LogicalLine> {
    let chars: Vec<char> = source.chars().collect();
    let mut lines = Vec::new();
    let mut tokens: Vec<(Token, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut indent = 0usize;
    let mut at_line_start = true;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if at_line_start {
            let mut width = 0;
            while i < chars.len() && matches!(chars[i], ' ' | '\t' | '\x0c') {
                width += if chars[i] == '\t' { 8 - width % 8 } else { 1 };
                i += 1;
            }
            indent = width;
            at_line_start = false;
            continue;
        }
        match c {
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\\' if chars.get(i + 1) == Some(&'\n') => i += 2,
            '\n' => {
                i += 1;
                if depth == 0 {
                    if !tokens.is_empty() {
                        lines.push(LogicalLine {
                            indent,
                            tokens: std::mem::take(&mut tokens),
                        });
                    }
                    at_line_start = true;
                }
            }
            '\'' | '"' => {
                let triple = chars.get(i + 1) == Some(&c) && chars.get(i + 2) == Some(&c);
                i += if triple { 3 } else { 1 };
                let mut content = String::new();
                while i < chars.len() {
                    let d = chars[i];
                    if d == '\\' {
                        i += 2;
                        continue;
                    }
                    if triple {
                        if d == c && chars.get(i + 1) == Some(&c) && chars.get(i + 2) == Some(&c) {
                            i += 3;
                            break;
                        }
                    } else if d == c || d == '\n' {
                        i += 1;
                        break;
                    }
                    content.push(d);
                    i += 1;
                }
                // A string prefix (r, b, f, u...) was lexed as a name just before.
                if let Some((Token::Name(prefix), _)) = tokens.last()
                    && prefix.len() <= 2
                    && prefix.chars().all(|p| "rRbBuUfF".contains(p))
                {
                    tokens.pop();
                }
                tokens.push((Token::Str(content), depth));
            }
            c if c.is_alphabetic() || c == '_' || !c.is_ascii() => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || !chars[i].is_ascii())
                {
                    i += 1;
                }
                tokens.push((Token::Name(chars[start..i].iter().collect()), depth));
            }
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_whitespace() => i += 1,
            '(' | '[' | '{' => {
                tokens.push((Token::Op(c), depth));
                depth += 1;
                i += 1;
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                tokens.push((Token::Op(c), depth));
                i += 1;
            }
            c => {
                tokens.push((Token::Op(c), depth));
                i += 1;
            }
        }
    }
    if !tokens.is_empty() {
        lines.push(LogicalLine { indent, tokens });
    }
    lines
}

/// Blocks whose imports do not run when the module is imported, or only as a fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// A function body (or `if TYPE_CHECKING:`): runs later, or never.
    Deferred,
    Try(usize),
    /// `except ImportError:` (or `ModuleNotFoundError`) of a `try` block.
    Fallback(usize),
    /// Any other block; imports in it run.
    Plain,
}

/// Whether an `if`/`elif` condition is known to be false when a module is imported
/// on Linux: `TYPE_CHECKING`, another platform (`sys.platform == "win32"`,
/// `sys.platform.startswith("darwin")`, `os.name == "nt"`, a bare `_mswindows`-style
/// flag), or `__name__ == "__main__"` outside the main script. Compound conditions
/// are not evaluated.
fn condition_is_false(condition: &[(Token, usize)], is_main: bool) -> bool {
    let tokens: Vec<&Token> = condition.iter().map(|(t, _)| t).collect();
    let name = |i: usize| match tokens.get(i) {
        Some(Token::Name(n)) => Some(n.as_str()),
        _ => None,
    };
    let string = |i: usize| match tokens.get(i) {
        Some(Token::Str(s)) => Some(s.as_str()),
        _ => None,
    };
    let op = |i: usize, c: char| tokens.get(i) == Some(&&Token::Op(c));
    if tokens
        .iter()
        .any(|t| matches!(t, Token::Name(n) if n == "TYPE_CHECKING"))
    {
        return true;
    }
    if tokens
        .iter()
        .any(|t| matches!(t, Token::Name(n) if n == "and" || n == "or" || n == "not"))
    {
        return false;
    }
    let equals_at = |i: usize| op(i, '=') && op(i + 1, '=');
    match tokens.len() {
        1 => name(0).is_some_and(|n| {
            let n = n.to_ascii_lowercase();
            n.contains("windows") || n.contains("win32") || n.contains("mswin")
        }),
        // NAME == "STR"
        4 if equals_at(1) => match (name(0), string(3)) {
            (Some("__name__"), Some("__main__")) => !is_main,
            _ => false,
        },
        // MODULE . ATTR == "STR"
        6 if op(1, '.') && equals_at(3) => match (name(0), name(2), string(5)) {
            (Some("sys"), Some("platform"), Some(value)) => !value.starts_with("linux"),
            (Some("os"), Some("name"), Some(value)) => value != "posix",
            _ => false,
        },
        // sys . platform . startswith ( "STR" )
        8 if op(1, '.') && op(3, '.') && op(5, '(') => {
            name(0) == Some("sys")
                && name(2) == Some("platform")
                && name(4) == Some("startswith")
                && string(6).is_some_and(|prefix| !"linux".starts_with(prefix))
        }
        _ => false,
    }
}

/// The imports a module executes when it is imported, in source order.
/// `is_main`: the source runs as `__main__` (the script, or `-c`).
pub(crate) fn parse_imports(source: &str, is_main: bool) -> Vec<Import> {
    let mut imports = Vec::new();
    let mut blocks: Vec<(usize, Block)> = Vec::new();
    let mut tries = 0;
    let mut last_try_at: HashMap<usize, usize> = HashMap::new();
    for line in logical_lines(source) {
        while blocks
            .last()
            .is_some_and(|(indent, _)| line.indent <= *indent)
        {
            blocks.pop();
        }
        let deferred = blocks.iter().any(|(_, b)| *b == Block::Deferred);
        let guard = blocks
            .iter()
            .rev()
            .find_map(|(_, block)| match block {
                Block::Try(id) => Some(ImportGuard::Try(*id)),
                Block::Fallback(id) => Some(ImportGuard::Fallback(*id)),
                _ => None,
            })
            .unwrap_or(ImportGuard::Unguarded);
        for statement in line.tokens.split(|(t, d)| *t == Token::Op(';') && *d == 0) {
            let mut statement = statement;
            // A compound statement's body may follow its colon on the same line.
            while let Some((Token::Name(keyword), _)) = statement.first() {
                let opens = match keyword.as_str() {
                    // The main script usually calls its functions (`main()`).
                    "def" | "async" | "lambda" if is_main => Some(Block::Plain),
                    "def" | "async" | "lambda" => Some(Block::Deferred),
                    "if" | "elif"
                        if condition_is_false(
                            &statement[1..statement
                                .iter()
                                .position(|(t, d)| *t == Token::Op(':') && *d == 0)
                                .unwrap_or(statement.len())],
                            is_main,
                        ) =>
                    {
                        Some(Block::Deferred)
                    }
                    "except"
                        if statement.iter().any(|(t, _)| {
                            matches!(t, Token::Name(n) if n == "ImportError" || n == "ModuleNotFoundError")
                        }) =>
                    {
                        let id = last_try_at.get(&line.indent).copied().unwrap_or_else(|| {
                            tries += 1;
                            tries
                        });
                        Some(Block::Fallback(id))
                    }
                    "try" => {
                        tries += 1;
                        last_try_at.insert(line.indent, tries);
                        Some(Block::Try(tries))
                    }
                    "if" | "elif" | "else" | "except" | "finally" | "with" | "for" | "while"
                    | "class" => Some(Block::Plain),
                    _ => break,
                };
                let colon = statement
                    .iter()
                    .position(|(t, d)| *t == Token::Op(':') && *d == 0);
                let body_on_same_line = colon.is_some_and(|c| c + 1 < statement.len());
                match opens {
                    // `def f(): import x` runs nothing now.
                    Some(Block::Deferred) if body_on_same_line => {
                        statement = &[];
                        break;
                    }
                    Some(block) if !body_on_same_line => {
                        if block != Block::Plain {
                            blocks.push((line.indent, block));
                        }
                        statement = &[];
                        break;
                    }
                    _ => {}
                }
                match colon {
                    Some(c) => statement = &statement[c + 1..],
                    None => {
                        statement = &[];
                        break;
                    }
                }
            }
            if deferred {
                continue;
            }
            let tokens: Vec<&Token> = statement.iter().map(|(t, _)| t).collect();
            imports.extend(import_statement(&tokens, guard));
            imports.extend(import_calls(&tokens, guard));
        }
    }
    imports
}

fn name_of<'a>(token: Option<&&'a Token>) -> Option<&'a str> {
    match token {
        Some(Token::Name(name)) => Some(name),
        _ => None,
    }
}

/// Reads a dotted name starting at `*at`.
fn dotted_name(tokens: &[&Token], at: &mut usize) -> String {
    let mut name = String::new();
    while let Some(part) = name_of(tokens.get(*at)) {
        if part == "import" || part == "as" {
            break;
        }
        name.push_str(part);
        *at += 1;
        if tokens.get(*at) == Some(&&Token::Op('.')) {
            name.push('.');
            *at += 1;
        } else {
            break;
        }
    }
    name
}

fn import_statement(tokens: &[&Token], guard: ImportGuard) -> Vec<Import> {
    let mut imports = Vec::new();
    match name_of(tokens.first()) {
        Some("import") => {
            let mut at = 1;
            loop {
                let module = dotted_name(tokens, &mut at);
                if !module.is_empty() {
                    imports.push(Import {
                        module,
                        level: 0,
                        names: Vec::new(),
                        guard,
                    });
                }
                // Skip `as alias` up to the next comma.
                while at < tokens.len() && tokens[at] != &Token::Op(',') {
                    at += 1;
                }
                if at >= tokens.len() {
                    break;
                }
                at += 1;
            }
        }
        Some("from") => {
            let mut at = 1;
            let mut level = 0;
            while tokens.get(at) == Some(&&Token::Op('.')) {
                level += 1;
                at += 1;
            }
            let module = dotted_name(tokens, &mut at);
            if name_of(tokens.get(at)) != Some("import") {
                return imports;
            }
            at += 1;
            let mut names = Vec::new();
            let mut expect_name = true;
            while let Some(token) = tokens.get(at) {
                match token {
                    Token::Name(n) if n == "as" => expect_name = false,
                    Token::Name(n) if expect_name => {
                        names.push(n.clone());
                        expect_name = false;
                    }
                    Token::Op(',') => expect_name = true,
                    Token::Op('*') => names.push("*".to_owned()),
                    _ => {}
                }
                at += 1;
            }
            imports.push(Import {
                module,
                level,
                names,
                guard,
            });
        }
        _ => {}
    }
    imports
}

/// `__import__("name")` and `importlib.import_module("name")` with a literal name.
fn import_calls(tokens: &[&Token], guard: ImportGuard) -> Vec<Import> {
    let mut imports = Vec::new();
    for window in tokens.windows(3) {
        if let [Token::Name(function), Token::Op('('), Token::Str(module)] = window
            && (function == "__import__" || function == "import_module")
            && !module.is_empty()
            && module
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
            && !module.starts_with('.')
        {
            imports.push(Import {
                module: module.clone(),
                level: 0,
                names: Vec::new(),
                guard,
            });
        }
    }
    imports
}

/// Where a module was found.
#[derive(Debug, Clone)]
enum Location {
    /// A regular package: its `__init__` file and its directory.
    Package {
        init: ImagePath,
        dir: ImagePath,
    },
    /// A namespace package: directories without `__init__`.
    Namespace {
        dirs: Vec<ImagePath>,
    },
    Source(ImagePath),
    /// A `.pyc` without source.
    Sourceless(ImagePath),
    Extension(ImagePath),
    /// Frozen or built into the interpreter: no file.
    Builtin,
}

/// The interpreter being analyzed.
struct Interpreter {
    /// `cpython-311` (the bytecode cache tag).
    cache_tag: String,
    version: (u32, u32),
    sys_path: Vec<ImagePath>,
    stdlib: ImagePath,
    modules: HashMap<String, Option<Location>>,
    missing: Vec<String>,
    files_added: usize,
}

/// Options of the `python` command line that matter for what a start reads.
#[derive(Debug, Default)]
struct PythonArgs {
    script: Option<String>,
    command: Option<String>,
    module: Option<String>,
    no_site: bool,
    ignore_env: bool,
    /// The arguments the script (or `-c`/`-m`) gets.
    rest: Vec<String>,
}

fn parse_python_args(args: &[String]) -> PythonArgs {
    let mut parsed = PythonArgs::default();
    let rest_start = parse_python_options(args, &mut parsed);
    parsed.rest = args.get(rest_start..).unwrap_or_default().to_vec();
    parsed
}

/// Fills `parsed` from the interpreter options; returns where the program's own
/// arguments start.
fn parse_python_options(args: &[String], parsed: &mut PythonArgs) -> usize {
    let mut index = 0;
    while let Some(arg) = args.get(index) {
        index += 1;
        if arg == "-" || !arg.starts_with('-') {
            if arg != "-" {
                parsed.script = Some(arg.clone());
            }
            break;
        }
        if arg == "--" {
            parsed.script = args.get(index).cloned();
            return index + 1;
        }
        if arg.starts_with("--") {
            if arg == "--check-hash-based-pycs" {
                index += 1;
            }
            continue;
        }
        let flags: Vec<char> = arg[1..].chars().collect();
        for (at, flag) in flags.iter().enumerate() {
            let attached: String = flags[at + 1..].iter().collect();
            let mut value = || {
                if attached.is_empty() {
                    index += 1;
                    args.get(index - 1).cloned()
                } else {
                    Some(attached.clone())
                }
            };
            match flag {
                'c' => {
                    parsed.command = value();
                    return index;
                }
                'm' => {
                    parsed.module = value();
                    return index;
                }
                'W' | 'X' => {
                    value();
                    break;
                }
                'S' => parsed.no_site = true,
                'E' => parsed.ignore_env = true,
                'I' => parsed.ignore_env = true,
                _ => {}
            }
        }
    }
    index
}

/// `package.module:attribute`, how WSGI/ASGI servers and task runners name the
/// application they import (`gunicorn app.wsgi:application`, `uvicorn main:app`).
fn app_spec_module(arg: &str) -> Option<&str> {
    let (module, attribute) = arg.split_once(':')?;
    let is_name = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_alphanumeric() || c == '_')
    };
    let attribute = attribute.split('(').next().unwrap_or_default();
    (module.split('.').all(is_name) && is_name(attribute)).then_some(module)
}

/// `3.11` from `python3.11`.
fn version_from_name(name: &str) -> Option<(u32, u32)> {
    let version = name
        .strip_prefix("python")?
        .trim_end_matches(['d', 'm', 't']);
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

impl Analyzer<'_> {
    /// Follows a CPython start: `invoked` is the path `execve` was given (a venv's
    /// `bin/python` symlink), `program` the binary it resolves to.
    pub(super) fn python(
        &mut self,
        argv: &[String],
        invoked: &ImagePath,
        program: &ImagePath,
        cwd: &ImagePath,
        env: &Env,
    ) -> Result<(), PrefetchError> {
        let args = parse_python_args(&argv[1..]);
        let Some(mut interpreter) = self.find_interpreter(invoked, program, cwd, env, &args)?
        else {
            self.warnings.push(Warning::PythonStdlibNotFound {
                interpreter: program.clone(),
            });
            if let Some(script) = &args.script {
                self.add_file(
                    cwd,
                    script,
                    Reason::CommandArgument {
                        program: program.clone(),
                    },
                )?;
            }
            return Ok(());
        };
        self.python_locale(program, env)?;
        // What the interpreter imports before the script runs.
        let mut roots: Vec<(String, String)> = Vec::new();
        let startup = "<startup>".to_owned();
        for module in STARTUP_MODULES {
            roots.push(((*module).to_owned(), startup.clone()));
        }
        if interpreter.version < (3, 11) {
            for module in UNFROZEN_STARTUP_MODULES {
                roots.push(((*module).to_owned(), startup.clone()));
            }
        }
        if !args.no_site {
            for module in ["sitecustomize", "usercustomize"] {
                roots.push((module.to_owned(), "site".to_owned()));
            }
            for pth_import in self.python_pth_files(&mut interpreter)? {
                roots.push((pth_import, "a .pth file".to_owned()));
            }
        }
        // Servers import the application named on their command line, with the
        // working directory on `sys.path`.
        let app_modules: Vec<&str> = args
            .rest
            .iter()
            .filter_map(|a| app_spec_module(a))
            .collect();
        if !app_modules.is_empty() {
            if !interpreter.sys_path.contains(cwd) {
                interpreter
                    .sys_path
                    .insert(1.min(interpreter.sys_path.len()), cwd.clone());
            }
            for module in app_modules {
                roots.push((module.to_owned(), "the command line".to_owned()));
            }
        }
        let mut main_imports = Vec::new();
        let main_name = "__main__".to_owned();
        if let Some(code) = &args.command {
            main_imports = parse_imports(code, true);
        } else if let Some(module) = &args.module {
            roots.push((module.clone(), main_name.clone()));
            roots.push((format!("{module}.__main__"), main_name.clone()));
        } else if let Some(script) = &args.script {
            let reason = Reason::CommandArgument {
                program: program.clone(),
            };
            let mut script_path = self.add_file(cwd, script, reason.clone())?;
            if script_path.is_none() {
                // A directory with `__main__.py` runs like a script.
                let main_py = format!("{script}/__main__.py");
                script_path = self.add_file(cwd, &main_py, reason)?;
            }
            match script_path {
                Some(path) => {
                    let source = self.view.read(&path, MAX_SOURCE_BYTES)?;
                    main_imports = parse_imports(&String::from_utf8_lossy(&source), true);
                }
                None => {
                    let resolution = resolve(self.view, cwd, script, true)?;
                    self.warn_unresolved(script, &resolution, "python script");
                }
            }
        }
        let mut queue: VecDeque<(String, String, usize)> = roots
            .into_iter()
            .map(|(module, by)| (module, by, 1))
            .collect();
        for import in &main_imports {
            let (modules, probes) = Self::absolute_names(import, "");
            for module in modules.into_iter().chain(probes) {
                queue.push_back((module, main_name.clone(), 1));
            }
        }
        let mut visited: HashSet<String> = HashSet::new();
        while let Some((module, imported_by, depth)) = queue.pop_front() {
            if !visited.insert(module.clone()) {
                continue;
            }
            if interpreter.files_added >= MAX_MODULE_FILES {
                self.warnings.push(Warning::LimitReached {
                    what: format!("python module files, at `{module}`"),
                });
                break;
            }
            let imported = self.import_module(&mut interpreter, &module, &imported_by, env)?;
            if let Some(Some(Location::Extension(_))) = interpreter.modules.get(&module)
                && let Some((_, extra)) = EXTENSION_IMPORTS.iter().find(|(m, _)| *m == module)
            {
                for name in *extra {
                    queue.push_back(((*name).to_owned(), module.clone(), depth + 1));
                }
            }
            let Some((source, package)) = imported else {
                continue;
            };
            if depth >= MAX_IMPORT_DEPTH {
                continue;
            }
            let text = self.view.read(&source, MAX_SOURCE_BYTES)?;
            let imports = parse_imports(&String::from_utf8_lossy(&text), false);
            let mut failed_tries = HashSet::new();
            for import in &imports {
                if let ImportGuard::Fallback(id) = import.guard
                    && !failed_tries.contains(&id)
                {
                    continue;
                }
                let (modules, probes) = Self::absolute_names(import, &package);
                for name in &modules {
                    if let ImportGuard::Try(id) = import.guard
                        && !self.module_exists(&mut interpreter, name)?
                    {
                        failed_tries.insert(id);
                    }
                }
                for name in modules.into_iter().chain(probes) {
                    queue.push_back((name, module.clone(), depth + 1));
                }
            }
        }
        if !interpreter.missing.is_empty() {
            interpreter.missing.sort();
            interpreter.missing.truncate(MAX_REPORTED_MISSING);
            self.warnings.push(Warning::PythonModulesNotFound {
                modules: interpreter.missing,
            });
        }
        Ok(())
    }

    /// The interpreter's version, standard library and `sys.path`, plus what its
    /// path setup reads (`pyvenv.cfg`).
    fn find_interpreter(
        &mut self,
        invoked: &ImagePath,
        program: &ImagePath,
        cwd: &ImagePath,
        env: &Env,
        args: &PythonArgs,
    ) -> Result<Option<Interpreter>, PrefetchError> {
        let version = version_from_name(program.file_name());
        // The prefix is the nearest ancestor of the binary with `lib/pythonX.Y/os.py`.
        let mut stdlib = None;
        let mut dir = program.parent();
        loop {
            let lib = dir.join("lib");
            if let Some(names) = self.list_dir(&lib)? {
                let mut candidates: Vec<&String> = names
                    .iter()
                    .filter(|n| match version {
                        Some((major, minor)) => **n == format!("python{major}.{minor}"),
                        None => version_from_name(n).is_some(),
                    })
                    .collect();
                candidates.sort_by_key(|n| version_from_name(n));
                for name in candidates.into_iter().rev() {
                    let candidate = lib.join(name);
                    if self
                        .list_dir(&candidate)?
                        .is_some_and(|names| names.iter().any(|n| n == "os.py"))
                    {
                        stdlib = Some(candidate);
                        break;
                    }
                }
            }
            if stdlib.is_some() || dir.is_root() {
                break;
            }
            dir = dir.parent();
        }
        let Some(stdlib) = stdlib else {
            return Ok(None);
        };
        let Some(version) = version.or_else(|| version_from_name(stdlib.file_name())) else {
            return Ok(None);
        };
        let (major, minor) = version;
        let prefix = stdlib.parent().parent();
        let mut sys_path = Vec::new();
        // sys.path[0]: the script's directory (symlinks resolved), else the cwd.
        match &args.script {
            Some(script) if args.command.is_none() && args.module.is_none() => {
                let resolution = resolve(self.view, cwd, script, true)?;
                if resolution.info.as_ref().is_some_and(FileInfo::is_dir) {
                    sys_path.push(resolution.path);
                } else {
                    sys_path.push(resolution.path.parent());
                }
            }
            _ => sys_path.push(cwd.clone()),
        }
        if !args.ignore_env
            && let Some(python_path) = env.get("PYTHONPATH")
        {
            sys_path.extend(
                python_path
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(|d| cwd.join(d)),
            );
        }
        sys_path.push(stdlib.clone());
        sys_path.push(stdlib.join("lib-dynload"));
        if !args.no_site {
            // A venv: `pyvenv.cfg` next to the invoked binary or one level up.
            let invoked_dir = invoked.parent();
            let mut venv = None;
            for dir in [invoked_dir.clone(), invoked_dir.parent()] {
                let cfg = dir.join("pyvenv.cfg");
                if self
                    .add_file(cwd, cfg.as_str(), Reason::PythonSite)?
                    .is_some()
                {
                    venv = Some(dir);
                    break;
                }
            }
            if let Some(venv) = &venv {
                sys_path.push(venv.join(&format!("lib/python{major}.{minor}/site-packages")));
            }
            if venv.is_none() {
                sys_path.push(prefix.join(&format!("lib/python{major}.{minor}/site-packages")));
                if prefix.as_str() == "/usr" {
                    // A distribution's own python: Fedora's platlib, and Debian's
                    // patched `site` with its dist-packages directories.
                    for dir in [
                        format!("/usr/lib64/python{major}.{minor}/site-packages"),
                        format!("/usr/local/lib/python{major}.{minor}/dist-packages"),
                        format!("/usr/lib/python{major}/dist-packages"),
                        format!("/usr/lib/python{major}.{minor}/dist-packages"),
                    ] {
                        sys_path.push(ImagePath::new(&dir));
                    }
                }
            }
        }
        let mut usable = Vec::new();
        for dir in sys_path {
            let resolution = resolve(self.view, &ImagePath::root(), dir.as_str(), true)?;
            if resolution.info.as_ref().is_some_and(FileInfo::is_dir)
                && !usable.contains(&resolution.path)
            {
                usable.push(resolution.path);
            }
        }
        Ok(Some(Interpreter {
            cache_tag: format!("cpython-{major}{minor}"),
            version,
            sys_path: usable,
            stdlib,
            modules: HashMap::new(),
            missing: Vec::new(),
            files_added: 0,
        }))
    }

    /// `.pth` files in the site directories, read by `site` at start. Returns the
    /// modules their `import` lines import; adds their path lines to `sys.path`.
    fn python_pth_files(
        &mut self,
        interpreter: &mut Interpreter,
    ) -> Result<Vec<String>, PrefetchError> {
        let mut imports = Vec::new();
        let site_dirs: Vec<ImagePath> = interpreter
            .sys_path
            .iter()
            .filter(|d| d.file_name() == "site-packages" || d.file_name() == "dist-packages")
            .cloned()
            .collect();
        for dir in site_dirs {
            let Some(names) = self.list_dir(&dir)? else {
                continue;
            };
            for name in names
                .iter()
                .filter(|n| n.ends_with(".pth") && !n.starts_with('.'))
            {
                let Some(pth) = self.add_file(&dir, name, Reason::PythonSite)? else {
                    continue;
                };
                let text = self.view.read(&pth, MAX_PTH_BYTES)?;
                for line in String::from_utf8_lossy(&text).lines() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    if line.starts_with("import ") || line.starts_with("import\t") {
                        imports.extend(parse_imports(line, false).into_iter().map(|i| i.module));
                    } else {
                        let resolution = resolve(self.view, &dir, line, true)?;
                        if resolution.info.as_ref().is_some_and(FileInfo::is_dir)
                            && !interpreter.sys_path.contains(&resolution.path)
                        {
                            interpreter.sys_path.push(resolution.path);
                        }
                    }
                }
            }
        }
        Ok(imports)
    }

    /// CPython sets the C library's LC_CTYPE at start (coercing the C locale to C.UTF-8).
    fn python_locale(&mut self, program: &ImagePath, env: &Env) -> Result<(), PrefetchError> {
        let root = ImagePath::root();
        let locale = ["LC_ALL", "LC_CTYPE", "LANG"]
            .iter()
            .find_map(|name| env.get(*name).filter(|v| !v.is_empty()))
            .cloned()
            .unwrap_or_default();
        // glibc reads the alias table when it looks a locale name up.
        self.add_file(&root, "/usr/share/locale/locale.alias", Reason::Locale)?;
        if locale.is_empty() || locale == "C" || locale == "POSIX" {
            for candidate in [
                "/usr/lib/locale/C.utf8/LC_CTYPE",
                "/usr/lib/locale/C.UTF-8/LC_CTYPE",
            ] {
                if self.add_file(&root, candidate, Reason::Locale)?.is_some() {
                    break;
                }
            }
        } else {
            let archive = resolve(self.view, &root, "/usr/lib/locale/locale-archive", true)?;
            let small_archive = archive
                .info
                .as_ref()
                .is_some_and(|i| i.is_file() && i.size <= MAX_LOCALE_ARCHIVE_BYTES);
            if small_archive {
                self.add_links(&archive, "/usr/lib/locale/locale-archive");
                self.add(&archive.path, PrefetchKind::File, Reason::Locale);
            }
            // glibc normalizes the codeset: `en_US.UTF-8` is stored as `en_US.utf8`.
            let normalized = match locale.split_once('.') {
                Some((name, codeset)) => format!(
                    "{name}.{}",
                    codeset
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .collect::<String>()
                        .to_lowercase()
                ),
                None => locale.clone(),
            };
            for name in [&locale, &normalized] {
                self.add_file(
                    &root,
                    &format!("/usr/lib/locale/{name}/LC_CTYPE"),
                    Reason::Locale,
                )?;
            }
        }
        let header = self.view.read(program, 64)?;
        let mut lib_dirs: Vec<String> = Vec::new();
        if let Some(identity) = elf::identity(&header) {
            lib_dirs.extend(identity.triplet().map(|t| format!("/usr/lib/{t}")));
            if identity.is_64 {
                lib_dirs.push("/usr/lib64".to_owned());
            }
        }
        lib_dirs.push("/usr/lib".to_owned());
        for dir in lib_dirs {
            let cache = format!("{dir}/gconv/gconv-modules.cache");
            if self.add_file(&root, &cache, Reason::Locale)?.is_some() {
                break;
            }
        }
        Ok(())
    }

    /// The absolute module names an import statement in `package` loads.
    /// Also returns, separately, `pkg.name` for each `from pkg import name`: loaded
    /// when `name` is a submodule, else just an attribute.
    fn absolute_names(import: &Import, package: &str) -> (Vec<String>, Vec<String>) {
        let base = if import.level == 0 {
            import.module.clone()
        } else {
            let mut parts: Vec<&str> = package.split('.').filter(|p| !p.is_empty()).collect();
            if parts.is_empty() || import.level - 1 > parts.len() {
                return (Vec::new(), Vec::new());
            }
            parts.truncate(parts.len() - (import.level - 1));
            let mut base = parts.join(".");
            if !import.module.is_empty() {
                if !base.is_empty() {
                    base.push('.');
                }
                base.push_str(&import.module);
            }
            base
        };
        if base.is_empty() {
            return (Vec::new(), Vec::new());
        }
        // `import a.b.c` imports `a`, then `a.b`, then `a.b.c`.
        let mut names = Vec::new();
        let mut prefix = String::new();
        for part in base.split('.') {
            if !prefix.is_empty() {
                prefix.push('.');
            }
            prefix.push_str(part);
            names.push(prefix.clone());
        }
        let probes = import
            .names
            .iter()
            .filter(|name| *name != "*")
            .map(|name| format!("{base}.{name}"))
            .collect();
        (names, probes)
    }

    fn module_exists(
        &mut self,
        interpreter: &mut Interpreter,
        module: &str,
    ) -> Result<bool, PrefetchError> {
        Ok(self.find_module(interpreter, module)?.is_some())
    }

    /// Finds `module` the way the path-based finder does.
    fn find_module(
        &mut self,
        interpreter: &mut Interpreter,
        module: &str,
    ) -> Result<Option<Location>, PrefetchError> {
        if let Some(found) = interpreter.modules.get(module) {
            return Ok(found.clone());
        }
        let found = self.locate_module(interpreter, module)?;
        interpreter.modules.insert(module.to_owned(), found.clone());
        Ok(found)
    }

    fn locate_module(
        &mut self,
        interpreter: &mut Interpreter,
        module: &str,
    ) -> Result<Option<Location>, PrefetchError> {
        if ALWAYS_BUILTIN.contains(&module)
            || (interpreter.version >= (3, 11) && FROZEN_SINCE_3_11.contains(&module))
        {
            return Ok(Some(Location::Builtin));
        }
        let (search, name) = match module.rsplit_once('.') {
            Some((parent, name)) => match self.find_module(interpreter, parent)? {
                Some(Location::Package { dir, .. }) => (vec![dir], name),
                Some(Location::Namespace { dirs }) => (dirs, name),
                _ => return Ok(None),
            },
            None => (interpreter.sys_path.clone(), module),
        };
        let tag = interpreter.cache_tag.clone();
        let mut namespace = Vec::new();
        for dir in &search {
            let Some(names) = self.list_dir(dir)? else {
                continue;
            };
            if names.binary_search(&name.to_owned()).is_ok() {
                let package = dir.join(name);
                if let Some(inner) = self.list_dir(&package)? {
                    if inner.binary_search(&"__init__.py".to_owned()).is_ok() {
                        return Ok(Some(Location::Package {
                            init: package.join("__init__.py"),
                            dir: package,
                        }));
                    }
                    namespace.push(package);
                }
            }
            if let Some(extension) = find_extension(&names, name, &tag) {
                return Ok(Some(Location::Extension(dir.join(&extension))));
            }
            let py = format!("{name}.py");
            if names.binary_search(&py).is_ok() {
                return Ok(Some(Location::Source(dir.join(&py))));
            }
            let pyc = format!("{name}.pyc");
            if names.binary_search(&pyc).is_ok() {
                return Ok(Some(Location::Sourceless(dir.join(&pyc))));
            }
        }
        if !namespace.is_empty() {
            return Ok(Some(Location::Namespace { dirs: namespace }));
        }
        Ok(None)
    }

    /// Adds the files importing `module` reads. Returns the source to scan for further
    /// imports and the package relative imports in it are resolved against.
    fn import_module(
        &mut self,
        interpreter: &mut Interpreter,
        module: &str,
        imported_by: &str,
        env: &Env,
    ) -> Result<Option<(ImagePath, String)>, PrefetchError> {
        let Some(location) = self.find_module(interpreter, module)? else {
            let is_submodule_probe = module.contains('.');
            if !is_submodule_probe && !interpreter.missing.iter().any(|m| m == module) {
                interpreter.missing.push(module.to_owned());
            }
            return Ok(None);
        };
        self.module_data_files(interpreter, module, env)?;
        let reason = |file| Reason::PythonModule {
            module: module.to_owned(),
            file,
            imported_by: imported_by.to_owned(),
        };
        let root = ImagePath::root();
        let (source, package) = match location {
            Location::Builtin | Location::Namespace { .. } => return Ok(None),
            Location::Extension(path) => {
                if let Some(path) =
                    self.add_file(&root, path.as_str(), reason(ModuleFile::Extension))?
                {
                    interpreter.files_added += 1;
                    if let Ok((identity, deps)) = elf::inspect(self.view, &path)? {
                        self.load_needed(&path, identity, deps, env)?;
                    }
                }
                return Ok(None);
            }
            Location::Sourceless(path) => {
                if self
                    .add_file(&root, path.as_str(), reason(ModuleFile::Bytecode))?
                    .is_some()
                {
                    interpreter.files_added += 1;
                }
                return Ok(None);
            }
            Location::Package { init, .. } => (init, module.to_owned()),
            Location::Source(path) => (
                path,
                module
                    .rsplit_once('.')
                    .map(|(parent, _)| parent.to_owned())
                    .unwrap_or_default(),
            ),
        };
        let stem = source.file_name().trim_end_matches(".py").to_owned();
        let pyc = source
            .parent()
            .join(&format!("__pycache__/{stem}.{}.pyc", interpreter.cache_tag));
        if self
            .add_file(&root, pyc.as_str(), reason(ModuleFile::Bytecode))?
            .is_some()
        {
            interpreter.files_added += 1;
        }
        // The cache lives next to the path the module was found at; the source itself
        // is read through any symlink.
        let Some(source) = self.add_file(&root, source.as_str(), reason(ModuleFile::Source))?
        else {
            return Ok(None);
        };
        interpreter.files_added += 1;
        Ok(Some((source, package)))
    }

    /// Files some modules open when imported, which no import statement shows.
    fn module_data_files(
        &mut self,
        interpreter: &mut Interpreter,
        module: &str,
        env: &Env,
    ) -> Result<(), PrefetchError> {
        let root = ImagePath::root();
        let reason = || Reason::ModuleData {
            wanted_by: module.to_owned(),
        };
        match module {
            // `sysconfig` imports `_sysconfigdata_<abi>_<platform>_<multiarch>` by a computed name.
            "sysconfig" => {
                let stdlib = interpreter.stdlib.clone();
                let names: Vec<String> = self
                    .list_dir(&stdlib)?
                    .map(|names| {
                        names
                            .iter()
                            .filter(|n| n.starts_with("_sysconfigdata_") && n.ends_with(".py"))
                            .map(|n| n.trim_end_matches(".py").to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                for name in names {
                    self.import_module(interpreter, &name, module, env)?;
                }
            }
            "gettext" => {
                self.add_file(&root, "/usr/share/locale/locale.alias", reason())?;
            }
            "datetime" | "time" | "logging" if !env.contains_key("TZ") => {
                self.add_file(&root, "/etc/localtime", reason())?;
            }
            "_hashlib" | "_ssl" => {
                for cnf in [
                    "/usr/lib/ssl/openssl.cnf",
                    "/etc/ssl/openssl.cnf",
                    "/etc/pki/tls/openssl.cnf",
                ] {
                    if self.add_file(&root, cnf, reason())?.is_some() {
                        break;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `NAME.cpython-311-x86_64-linux-gnu.so`, `NAME.abi3.so` or `NAME.so` in `names`.
fn find_extension(names: &[String], name: &str, cache_tag: &str) -> Option<String> {
    let prefix = format!("{name}.");
    let start = names.partition_point(|n| n.as_str() < prefix.as_str());
    let mut abi3 = None;
    let mut plain = None;
    for candidate in names[start..].iter().take_while(|n| n.starts_with(&prefix)) {
        let Some(middle) = candidate[prefix.len()..].strip_suffix(".so") else {
            continue;
        };
        if middle.starts_with(cache_tag) {
            return Some(candidate.clone());
        } else if middle == "abi3" {
            abi3 = Some(candidate.clone());
        } else if middle.is_empty() {
            plain = Some(candidate.clone());
        }
    }
    abi3.or(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(source: &str) -> Vec<(String, usize, Vec<String>, ImportGuard)> {
        parse_imports(source, false)
            .into_iter()
            .map(|i| (i.module, i.level, i.names, i.guard))
            .collect()
    }

    fn plain(name: &str) -> (String, usize, Vec<String>, ImportGuard) {
        (name.to_owned(), 0, Vec::new(), ImportGuard::Unguarded)
    }

    #[test]
    fn finds_import_forms() {
        let source = r#"
import a.b, c as d
from x.y import (p,
    q as r)
from . import z
from ..pkg.mod import *
import e; import f
if True: import g
"#;
        assert_eq!(
            modules(source),
            vec![
                plain("a.b"),
                plain("c"),
                (
                    "x.y".to_owned(),
                    0,
                    vec!["p".to_owned(), "q".to_owned()],
                    ImportGuard::Unguarded
                ),
                (
                    String::new(),
                    1,
                    vec!["z".to_owned()],
                    ImportGuard::Unguarded
                ),
                (
                    "pkg.mod".to_owned(),
                    2,
                    vec!["*".to_owned()],
                    ImportGuard::Unguarded
                ),
                plain("e"),
                plain("f"),
                plain("g"),
            ]
        );
    }

    #[test]
    fn ignores_strings_comments_and_function_bodies() {
        let source = r#"
# import commented
s = "import in_string"
doc = """
import in_docstring
"""
r = rb'import raw'
def later():
    import in_function
    if x:
        import deeper
class K:
    import in_class
def one_liner(): import nope
import after_def
x = __import__("dynamic.name")
"#;
        assert_eq!(
            modules(source),
            vec![plain("in_class"), plain("after_def"), plain("dynamic.name")]
        );
        // The main script's functions are expected to run (`main()`).
        let main: Vec<String> = parse_imports(source, true)
            .into_iter()
            .map(|i| i.module)
            .collect();
        assert!(main.contains(&"in_function".to_owned()) && main.contains(&"deeper".to_owned()));
    }

    #[test]
    fn skips_branches_that_are_false_on_linux_at_import() {
        let source = r#"
if sys.platform == 'win32':
    import _winapi
elif sys.platform.startswith("darwin"):
    import _scproxy
else:
    import _posixsubprocess
if os.name == "nt": import nt
if sys.platform != "win32":
    import fcntl
if _mswindows:
    import msvcrt
if sys.platform == "win32" or FORCE:
    import maybe
if TYPE_CHECKING:
    import typing_only
if __name__ == "__main__":
    import doctest
"#;
        assert_eq!(
            modules(source),
            vec![plain("_posixsubprocess"), plain("fcntl"), plain("maybe")]
        );
        let main: Vec<String> = parse_imports(source, true)
            .into_iter()
            .map(|i| i.module)
            .collect();
        assert!(
            main.contains(&"doctest".to_owned()),
            "the script runs its main block"
        );
    }

    #[test]
    fn marks_import_error_fallbacks() {
        let source = "try:\n    import _fast\nexcept ImportError:\n    import _slow\nimport after\n\
             try:\n    import _c\nexcept (AttributeError, ImportError):\n    import _d\n";
        let _fast = "_fast".to_owned();
        assert_eq!(
            modules(source),
            vec![
                (_fast, 0, vec![], ImportGuard::Try(1)),
                ("_slow".to_owned(), 0, vec![], ImportGuard::Fallback(1)),
                plain("after"),
                ("_c".to_owned(), 0, vec![], ImportGuard::Try(2)),
                ("_d".to_owned(), 0, vec![], ImportGuard::Fallback(2)),
            ]
        );
    }

    #[test]
    fn python_arguments() {
        let args = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let parsed = parse_python_args(&args(&[
            "-u", "-W", "ignore", "-X", "dev", "app.py", "-c", "x",
        ]));
        assert_eq!(parsed.script.as_deref(), Some("app.py"));
        assert!(parsed.command.is_none());
        let parsed = parse_python_args(&args(&["-Bm", "http.server", "80"]));
        assert_eq!(parsed.module.as_deref(), Some("http.server"));
        assert_eq!(parsed.rest, vec!["80"]);
        let parsed = parse_python_args(&args(&[
            "/usr/local/bin/gunicorn",
            "-b",
            ":80",
            "app:create()",
        ]));
        assert_eq!(parsed.rest, vec!["-b", ":80", "app:create()"]);
        assert_eq!(app_spec_module("app.wsgi:application"), Some("app.wsgi"));
        assert_eq!(app_spec_module("app:create()"), Some("app"));
        assert_eq!(app_spec_module(":80"), None);
        assert_eq!(app_spec_module("0.0.0.0:80"), None);
        assert_eq!(app_spec_module("http://x"), None);
        let parsed = parse_python_args(&args(&["-S", "-c", "import json"]));
        assert_eq!(parsed.command.as_deref(), Some("import json"));
        assert!(parsed.no_site);
    }

    #[test]
    fn extension_names() {
        let names: Vec<String> = [
            "_json.abi3.so",
            "_json.cpython-311-x86_64-linux-gnu.so",
            "_jsonx.so",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(
            find_extension(&sorted, "_json", "cpython-311").as_deref(),
            Some("_json.cpython-311-x86_64-linux-gnu.so")
        );
        assert_eq!(
            find_extension(&sorted, "_json", "cpython-312").as_deref(),
            Some("_json.abi3.so")
        );
        assert_eq!(find_extension(&sorted, "_js", "cpython-311"), None);
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
            let _ = parse_imports(&text, false);
        }
    }
}

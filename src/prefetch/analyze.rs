//! Follows a container's start the way the kernel and the program's loaders do,
//! collecting every file they read.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::rc::Rc;

use super::elf::{self, ElfDeps, ElfIdentity};
use super::shell::{self, ShellCommand};
use super::view::{FileInfo, ImageView, Resolution, ResolveFailure, resolve};
use super::{
    ImageConfigInfo, ImagePath, PrefetchEntry, PrefetchError, PrefetchKind, PrefetchList, Reason,
    Warning,
};

/// runc's (and Docker's) `PATH` when the image sets none.
pub(super) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The kernel reads this much of a file to pick its binary format (`BINPRM_BUF_SIZE`).
const EXEC_HEADER_BYTES: usize = 256;
/// Nested `#!` interpreters and wrapper commands followed from one command.
const MAX_EXEC_DEPTH: usize = 8;
/// Programs followed in total (shell strings can name many).
const MAX_EXECS: usize = 64;
/// Simple commands followed in one `sh -c` string.
const MAX_SHELL_COMMANDS: usize = 16;
/// Shared libraries followed in total.
const MAX_LIBRARIES: usize = 1024;
/// Arguments of one command checked for naming a file.
const MAX_FILE_ARGS: usize = 32;
/// `include` nesting in `/etc/ld.so.conf`.
const MAX_LD_CONF_DEPTH: usize = 8;
const MAX_CONFIG_BYTES: usize = 1024 * 1024;
const MAX_SCRIPT_BYTES: usize = 1024 * 1024;

pub(super) type Env = BTreeMap<String, String>;

/// Computes the files a container started from `config` reads, in order, from
/// the image seen through `view`. Nothing is run. What cannot be resolved is
/// reported in [`PrefetchList::warnings`]; only failures to read the view are errors.
pub fn analyze_entrypoint(
    view: &dyn ImageView,
    config: &ImageConfigInfo,
) -> Result<PrefetchList, PrefetchError> {
    let mut env = Env::new();
    for item in &config.env {
        match item.split_once('=') {
            Some((name, value)) => env.insert(name.to_owned(), value.to_owned()),
            None => env.insert(item.clone(), String::new()),
        };
    }
    env.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    let cwd = ImagePath::new(&config.working_dir);
    let argv: Vec<String> = config
        .entrypoint
        .iter()
        .chain(&config.cmd)
        .cloned()
        .collect();
    let mut analyzer = Analyzer::new(view);
    if argv.is_empty() {
        analyzer.warnings.push(Warning::EmptyCommand);
    } else {
        analyzer.exec(&argv, &cwd, &env, 0, None)?;
    }
    let mut entries = std::mem::take(&mut analyzer.entries);
    if !entries.is_empty() {
        // runc resolves the process user in the image before it runs anything.
        let root = ImagePath::root();
        for file in ["/etc/passwd", "/etc/group"] {
            analyzer.add_file(&root, file, Reason::RuntimeSetup)?;
        }
        analyzer.entries.append(&mut entries);
        entries = analyzer.entries;
    }
    Ok(PrefetchList {
        entries,
        warnings: analyzer.warnings,
    })
}

/// Which dynamic loader runs a program; they search for libraries differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoaderFlavor {
    Glibc,
    Musl,
}

/// The main program of the current process image, whose RPATH also applies to
/// every library it (indirectly) loads.
#[derive(Debug, Clone)]
struct MainObject {
    path: ImagePath,
    rpath: Vec<String>,
    flavor: LoaderFlavor,
}

pub(super) struct Analyzer<'v> {
    pub(super) view: &'v dyn ImageView,
    entries: Vec<PrefetchEntry>,
    seen: HashSet<ImagePath>,
    pub(super) warnings: Vec<Warning>,
    execs: usize,
    /// Library name (as in DT_NEEDED) to where it was found, per process image.
    loaded: HashMap<String, ImagePath>,
    loaded_paths: HashSet<ImagePath>,
    main: Option<MainObject>,
    ld_conf_dirs: Option<Vec<ImagePath>>,
    dir_listings: HashMap<ImagePath, Option<Rc<Vec<String>>>>,
}

impl<'v> Analyzer<'v> {
    fn new(view: &'v dyn ImageView) -> Analyzer<'v> {
        Analyzer {
            view,
            entries: Vec::new(),
            seen: HashSet::new(),
            warnings: Vec::new(),
            execs: 0,
            loaded: HashMap::new(),
            loaded_paths: HashSet::new(),
            main: None,
            ld_conf_dirs: None,
            dir_listings: HashMap::new(),
        }
    }

    pub(super) fn add(&mut self, path: &ImagePath, kind: PrefetchKind, reason: Reason) {
        if self.seen.insert(path.clone()) {
            self.entries.push(PrefetchEntry {
                path: path.clone(),
                kind,
                reason,
            });
        }
    }

    /// Adds the symlinks a resolution walked through.
    pub(super) fn add_links(&mut self, resolution: &Resolution, resolving: &str) {
        for link in &resolution.links {
            self.add(
                link,
                PrefetchKind::Symlink,
                Reason::Symlink {
                    resolving: resolving.to_owned(),
                },
            );
        }
    }

    /// Resolves `path` and, when it is a regular file, adds it (and the symlinks on
    /// the way) with `reason`. Returns the canonical path of the file.
    pub(super) fn add_file(
        &mut self,
        cwd: &ImagePath,
        path: &str,
        reason: Reason,
    ) -> Result<Option<ImagePath>, PrefetchError> {
        let resolution = resolve(self.view, cwd, path, true)?;
        if !resolution.info.as_ref().is_some_and(FileInfo::is_file) {
            return Ok(None);
        }
        self.add_links(&resolution, path);
        self.add(&resolution.path, PrefetchKind::File, reason);
        Ok(Some(resolution.path))
    }

    pub(super) fn warn_unresolved(&mut self, path: &str, resolution: &Resolution, context: &str) {
        self.warnings.push(Warning::Unresolved {
            path: path.to_owned(),
            failure: resolution.failure.unwrap_or(ResolveFailure::Missing),
            context: context.to_owned(),
        });
    }

    /// The sorted names in the directory `dir` (after resolving it), cached.
    pub(super) fn list_dir(
        &mut self,
        dir: &ImagePath,
    ) -> Result<Option<Rc<Vec<String>>>, PrefetchError> {
        if let Some(cached) = self.dir_listings.get(dir) {
            return Ok(cached.clone());
        }
        let resolution = resolve(self.view, &ImagePath::root(), dir.as_str(), true)?;
        let listing = if resolution.info.as_ref().is_some_and(FileInfo::is_dir) {
            Some(Rc::new(self.view.read_dir(&resolution.path)?))
        } else {
            None
        };
        self.dir_listings.insert(dir.clone(), listing.clone());
        Ok(listing)
    }

    /// Finds the program `execve` runs for `command`: a path (relative to `cwd`) when
    /// it contains `/`, else the first executable regular file in `PATH`. Returns the
    /// path handed to `execve` (symlinks not resolved) with its resolution.
    fn find_command(
        &mut self,
        command: &str,
        cwd: &ImagePath,
        env: &Env,
    ) -> Result<Option<(ImagePath, Resolution)>, PrefetchError> {
        if command.contains('/') {
            let resolution = resolve(self.view, cwd, command, true)?;
            if resolution.info.as_ref().is_some_and(FileInfo::is_file) {
                return Ok(Some((cwd.join(command), resolution)));
            }
            self.warn_unresolved(command, &resolution, "command");
            return Ok(None);
        }
        if command.is_empty() {
            return Ok(None);
        }
        let path_var = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        for dir in path_var.split(':') {
            let candidate = if dir.is_empty() {
                cwd.join(command)
            } else {
                cwd.join(dir).join(command)
            };
            let resolution = resolve(self.view, cwd, candidate.as_str(), true)?;
            if resolution
                .info
                .as_ref()
                .is_some_and(|info| info.is_file() && info.is_executable())
            {
                return Ok(Some((candidate, resolution)));
            }
        }
        Ok(None)
    }

    /// Follows `execve(argv[0], argv)` in `cwd` with `env`.
    fn exec(
        &mut self,
        argv: &[String],
        cwd: &ImagePath,
        env: &Env,
        depth: usize,
        reason: Option<Reason>,
    ) -> Result<(), PrefetchError> {
        let Some(command) = argv.first() else {
            return Ok(());
        };
        if depth > MAX_EXEC_DEPTH || self.execs >= MAX_EXECS {
            self.warnings.push(Warning::LimitReached {
                what: format!("programs followed, at `{command}`"),
            });
            return Ok(());
        }
        self.execs += 1;
        let Some((invoked, resolution)) = self.find_command(command, cwd, env)? else {
            self.warnings.push(Warning::CommandNotFound {
                command: command.clone(),
            });
            return Ok(());
        };
        self.add_links(&resolution, command);
        let program = resolution.path.clone();
        self.add(
            &program,
            PrefetchKind::File,
            reason.unwrap_or_else(|| Reason::Executable {
                command: command.clone(),
            }),
        );
        let header = self.view.read(&program, EXEC_HEADER_BYTES)?;
        if let Some(rest) = header.strip_prefix(b"#!") {
            // The kernel hands the interpreter the script path as exec'd.
            let script_arg = if command.contains('/') {
                command.clone()
            } else {
                invoked.as_str().to_owned()
            };
            let Some((interpreter, optional_arg)) = parse_shebang(rest) else {
                self.warnings
                    .push(Warning::UnknownExecutable { path: program });
                return Ok(());
            };
            let mut next = vec![interpreter];
            next.extend(optional_arg);
            next.push(script_arg);
            next.extend(argv[1..].iter().cloned());
            return self.exec(
                &next,
                cwd,
                env,
                depth + 1,
                Some(Reason::ScriptInterpreter { script: program }),
            );
        }
        if elf::identity(&header).is_none() {
            self.warnings
                .push(Warning::UnknownExecutable { path: program });
            return Ok(());
        }
        self.load_program(&program, env)?;
        self.program_semantics(argv, &invoked, &program, cwd, env, depth)
    }

    /// What a known program does with its arguments: runs another command, or reads
    /// a script or a file named on its command line.
    fn program_semantics(
        &mut self,
        argv: &[String],
        invoked: &ImagePath,
        program: &ImagePath,
        cwd: &ImagePath,
        env: &Env,
        depth: usize,
    ) -> Result<(), PrefetchError> {
        let mut name = program.file_name().to_owned();
        let mut args = &argv[1..];
        if name == "busybox" {
            let invoked = ImagePath::new(&argv[0]).file_name().to_owned();
            if invoked != "busybox" {
                name = invoked;
            } else if let Some((applet, rest)) = args.split_first() {
                name = applet.clone();
                args = rest;
            }
        }
        match name.as_str() {
            "sh" | "bash" | "dash" | "ash" | "zsh" | "ksh" | "mksh" | "hush" => {
                self.shell(args, program, cwd, env, depth)
            }
            "env" => self.env_command(args, cwd, env, depth),
            "node" | "nodejs" => self.node(args, program, cwd),
            "java" => self.java(args, program, cwd),
            _ if is_python_name(&name) => self.python(argv, invoked, program, cwd, env),
            _ => {
                if let Some(rest) = wrapped_command(&name, args) {
                    if !rest.is_empty() {
                        return self.exec(rest, cwd, env, depth + 1, None);
                    }
                    return Ok(());
                }
                self.file_arguments(args, program, cwd)
            }
        }
    }

    fn shell(
        &mut self,
        args: &[String],
        program: &ImagePath,
        cwd: &ImagePath,
        env: &Env,
        depth: usize,
    ) -> Result<(), PrefetchError> {
        let mut command_mode = false;
        let mut index = 0;
        while let Some(arg) = args.get(index) {
            if arg == "--" {
                index += 1;
                break;
            }
            let is_option = (arg.starts_with('-') || arg.starts_with('+')) && arg.len() > 1;
            if !is_option {
                break;
            }
            if arg.starts_with('-') && !arg.starts_with("--") && arg.contains('c') {
                command_mode = true;
            }
            // `-o OPTION` / `+o OPTION` take a value.
            if arg.len() == 2 && arg.ends_with('o') {
                index += 1;
            }
            index += 1;
        }
        let rest = args.get(index..).unwrap_or_default();
        let Some((first, positional)) = rest.split_first() else {
            return Ok(());
        };
        if !command_mode {
            return self.shell_script(first, positional, program, cwd, env, depth);
        }
        let lookup = |name: &str| env.get(name).cloned();
        let commands = shell::parse_commands(first, &lookup, positional);
        let mut cwd = cwd.clone();
        for command in commands.iter().take(MAX_SHELL_COMMANDS) {
            self.shell_command(command, program, &mut cwd, env, depth)?;
        }
        if commands.len() > MAX_SHELL_COMMANDS {
            self.warnings.push(Warning::LimitReached {
                what: format!("shell commands in `{first}`"),
            });
        }
        Ok(())
    }

    /// A script run by a shell. Only its `exec` commands are followed: they replace
    /// the shell, typically with the container's real program (`exec "$@"` in an
    /// entrypoint script); other commands may sit in branches or functions that
    /// never run.
    fn shell_script(
        &mut self,
        script: &str,
        args: &[String],
        shell: &ImagePath,
        cwd: &ImagePath,
        env: &Env,
        depth: usize,
    ) -> Result<(), PrefetchError> {
        let reason = Reason::CommandArgument {
            program: shell.clone(),
        };
        let Some(path) = self.add_file(cwd, script, reason)? else {
            let resolution = resolve(self.view, cwd, script, true)?;
            self.warn_unresolved(script, &resolution, "shell script");
            return Ok(());
        };
        let text = self.view.read(&path, MAX_SCRIPT_BYTES)?;
        let text = String::from_utf8_lossy(&text);
        let mut positional = vec![script.to_owned()];
        positional.extend(args.iter().cloned());
        let lookup = |name: &str| env.get(name).cloned();
        let commands = shell::parse_commands(&text, &lookup, &positional);
        let execs = commands.iter().filter(|command| {
            command
                .words
                .iter()
                .find(|word| {
                    !word.as_ref().is_some_and(|w| {
                        w.split_once('=')
                            .is_some_and(|(name, _)| is_identifier(name))
                    })
                })
                .is_some_and(|word| word.as_deref() == Some("exec"))
        });
        let mut cwd = cwd.clone();
        for command in execs.take(MAX_SHELL_COMMANDS) {
            self.shell_command(command, shell, &mut cwd, env, depth)?;
        }
        Ok(())
    }

    fn shell_command(
        &mut self,
        command: &ShellCommand,
        shell: &ImagePath,
        cwd: &mut ImagePath,
        env: &Env,
        depth: usize,
    ) -> Result<(), PrefetchError> {
        let mut words = command.words.as_slice();
        let mut env = env.clone();
        loop {
            let Some((first, rest)) = words.split_first() else {
                return Ok(());
            };
            let Some(first) = first else {
                self.warnings.push(Warning::ShellCommandSkipped {
                    command: command.text.clone(),
                    why: "the command name is computed at run time".to_owned(),
                });
                return Ok(());
            };
            if let Some((name, value)) = first.split_once('=')
                && is_identifier(name)
            {
                env.insert(name.to_owned(), value.to_owned());
                words = rest;
                continue;
            }
            match first.as_str() {
                "if" | "then" | "else" | "elif" | "while" | "until" | "do" | "!" | "{" | "exec"
                | "command" | "time" | "nohup" => {
                    words = rest;
                    while words
                        .first()
                        .is_some_and(|w| w.as_ref().is_some_and(|w| w.starts_with('-')))
                    {
                        words = &words[1..];
                    }
                }
                "cd" => {
                    if let Some(Some(dir)) = rest.first() {
                        *cwd = cwd.join(dir);
                    }
                    return Ok(());
                }
                "." | "source" => {
                    if let Some(Some(file)) = rest.first() {
                        let reason = Reason::CommandArgument {
                            program: shell.clone(),
                        };
                        self.add_file(cwd, file, reason)?;
                    }
                    return Ok(());
                }
                "fi" | "done" | "}" | "esac" | "for" | "case" | "in" | "echo" | "printf" | ":"
                | "true" | "false" | "export" | "set" | "unset" | "test" | "[" | "[[" | "umask"
                | "ulimit" | "trap" | "wait" | "shift" | "read" | "local" | "return" | "exit"
                | "eval" | "alias" | "readonly" | "break" | "continue" | "let" | "declare"
                | "typeset" | "getopts" | "hash" | "type" => return Ok(()),
                _ => {
                    let argv: Vec<String> = words.iter().flatten().cloned().collect();
                    return self.exec(&argv, cwd, &env, depth + 1, None);
                }
            }
        }
    }

    /// `env [-i] [-u NAME] [-C DIR] [-S STRING] [NAME=VALUE]... COMMAND [ARG]...`
    fn env_command(
        &mut self,
        args: &[String],
        cwd: &ImagePath,
        env: &Env,
        depth: usize,
    ) -> Result<(), PrefetchError> {
        let mut env = env.clone();
        let mut cwd = cwd.clone();
        let mut queue: VecDeque<String> = args.iter().cloned().collect();
        while let Some(arg) = queue.front().cloned() {
            if arg == "--" {
                queue.pop_front();
                break;
            }
            if let Some(split) = arg
                .strip_prefix("-S")
                .or_else(|| arg.strip_prefix("--split-string="))
            {
                queue.pop_front();
                let split = if split.is_empty() {
                    queue.pop_front().unwrap_or_default()
                } else {
                    split.to_owned()
                };
                for word in split.split_whitespace().rev() {
                    queue.push_front(word.to_owned());
                }
                continue;
            }
            if arg == "-i" || arg == "--ignore-environment" {
                env.retain(|name, _| name == "PATH");
                queue.pop_front();
                continue;
            }
            if arg == "-u" || arg == "-C" || arg == "--unset" || arg == "--chdir" {
                queue.pop_front();
                let value = queue.pop_front().unwrap_or_default();
                if arg.ends_with('C') || arg == "--chdir" {
                    cwd = cwd.join(&value);
                } else {
                    env.remove(&value);
                }
                continue;
            }
            if let Some(dir) = arg.strip_prefix("--chdir=") {
                cwd = cwd.join(dir);
                queue.pop_front();
                continue;
            }
            if arg.starts_with('-') && arg.len() > 1 {
                queue.pop_front();
                continue;
            }
            if let Some((name, value)) = arg.split_once('=')
                && is_identifier(name)
            {
                env.insert(name.to_owned(), value.to_owned());
                queue.pop_front();
                continue;
            }
            break;
        }
        let argv: Vec<String> = queue.into_iter().collect();
        self.exec(&argv, &cwd, &env, depth + 1, None)
    }

    fn node(
        &mut self,
        args: &[String],
        program: &ImagePath,
        cwd: &ImagePath,
    ) -> Result<(), PrefetchError> {
        let mut index = 0;
        while let Some(arg) = args.get(index) {
            match arg.as_str() {
                "-e" | "--eval" | "-p" | "--print" | "-" => return Ok(()),
                "-r" | "--require" | "--loader" | "--import" | "--experimental-loader" => {
                    index += 2;
                }
                "--" => {
                    index += 1;
                    break;
                }
                _ if arg.starts_with('-') => index += 1,
                _ => break,
            }
        }
        let Some(script) = args.get(index) else {
            return Ok(());
        };
        for suffix in ["", ".js", ".mjs", ".cjs", "/index.js"] {
            let candidate = format!("{script}{suffix}");
            let reason = Reason::CommandArgument {
                program: program.clone(),
            };
            if self.add_file(cwd, &candidate, reason)?.is_some() {
                return Ok(());
            }
        }
        let resolution = resolve(self.view, cwd, script, true)?;
        self.warn_unresolved(script, &resolution, "node script");
        Ok(())
    }

    fn java(
        &mut self,
        args: &[String],
        program: &ImagePath,
        cwd: &ImagePath,
    ) -> Result<(), PrefetchError> {
        if let Some(at) = args.iter().position(|arg| arg == "-jar")
            && let Some(jar) = args.get(at + 1)
        {
            let reason = Reason::CommandArgument {
                program: program.clone(),
            };
            if self.add_file(cwd, jar, reason)?.is_none() {
                let resolution = resolve(self.view, cwd, jar, true)?;
                self.warn_unresolved(jar, &resolution, "java -jar");
            }
        }
        Ok(())
    }

    /// Arguments that name existing regular files (`-c /etc/app.conf`,
    /// `--config=conf/app.yaml`) are read by most programs at start.
    fn file_arguments(
        &mut self,
        args: &[String],
        program: &ImagePath,
        cwd: &ImagePath,
    ) -> Result<(), PrefetchError> {
        for arg in args.iter().take(MAX_FILE_ARGS) {
            let value = match arg.split_once('=') {
                Some((option, value)) if option.starts_with('-') => value,
                _ if arg.starts_with('-') => continue,
                _ => arg.as_str(),
            };
            if value.is_empty() || !(value.contains('/') || value.contains('.')) {
                continue;
            }
            let reason = Reason::CommandArgument {
                program: program.clone(),
            };
            self.add_file(cwd, value, reason)?;
        }
        Ok(())
    }

    /// Loads an ELF program the way the kernel and its dynamic loader do.
    fn load_program(&mut self, program: &ImagePath, env: &Env) -> Result<(), PrefetchError> {
        let (identity, deps) = match elf::inspect(self.view, program)? {
            Ok(parsed) => parsed,
            Err(detail) => {
                self.warnings.push(Warning::BadElf {
                    path: program.clone(),
                    detail,
                });
                return Ok(());
            }
        };
        // A new process image: nothing is loaded yet.
        self.loaded.clear();
        self.loaded_paths.clear();
        self.main = None;
        let Some(interpreter) = deps.interpreter.clone() else {
            // Static (or static-pie): the kernel maps it and nothing else is loaded.
            return Ok(());
        };
        let reason = Reason::DynamicLoader {
            program: program.clone(),
        };
        let root = ImagePath::root();
        let Some(loader) = self.add_file(&root, &interpreter, reason)? else {
            let resolution = resolve(self.view, &root, &interpreter, true)?;
            self.warn_unresolved(&interpreter, &resolution, "ELF interpreter");
            return Ok(());
        };
        let flavor = if loader.file_name().starts_with("ld-musl") || interpreter.contains("ld-musl")
        {
            LoaderFlavor::Musl
        } else {
            LoaderFlavor::Glibc
        };
        self.loaded_paths.insert(loader);
        self.main = Some(MainObject {
            path: program.clone(),
            rpath: if deps.runpath.is_empty() {
                deps.rpath.clone()
            } else {
                Vec::new()
            },
            flavor,
        });
        self.loader_start(flavor, identity, env)?;
        self.loaded_paths.insert(program.clone());
        self.load_needed(program, identity, deps, env)
    }

    /// What the dynamic loader reads before any library: preload lists and its cache.
    fn loader_start(
        &mut self,
        flavor: LoaderFlavor,
        identity: ElfIdentity,
        env: &Env,
    ) -> Result<(), PrefetchError> {
        let root = ImagePath::root();
        let mut preload = Vec::new();
        if let Some(list) = env.get("LD_PRELOAD") {
            preload.extend(
                list.split([':', ' '])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
        }
        if flavor == LoaderFlavor::Glibc {
            if let Some(path) = self.add_file(&root, "/etc/ld.so.preload", Reason::LoaderConfig)? {
                let text = self.view.read(&path, MAX_CONFIG_BYTES)?;
                let text = String::from_utf8_lossy(&text);
                preload.extend(
                    text.lines()
                        .map(|line| line.split('#').next().unwrap_or_default())
                        .flat_map(|line| line.split([' ', '\t', ':']))
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            self.add_file(&root, "/etc/ld.so.cache", Reason::LoaderConfig)?;
        } else {
            let path_file = format!("/etc/ld-musl-{}.path", identity.musl_arch());
            self.add_file(&root, &path_file, Reason::LoaderConfig)?;
        }
        let Some(main) = self.main.clone() else {
            return Ok(());
        };
        let no_deps = ElfDeps::default();
        for name in preload {
            let reason = Reason::Preload { name: name.clone() };
            let Some(found) =
                self.load_library(&name, &main.path, &no_deps, identity, env, reason)?
            else {
                self.warnings.push(Warning::LibraryNotFound {
                    name,
                    needed_by: main.path.clone(),
                });
                continue;
            };
            if self.loaded_paths.insert(found.clone())
                && let Ok((_, deps)) = elf::inspect(self.view, &found)?
            {
                self.load_needed(&found, identity, deps, env)?;
            }
        }
        Ok(())
    }

    /// Loads the `DT_NEEDED` closure of `object` breadth-first, as ld.so does.
    pub(super) fn load_needed(
        &mut self,
        object: &ImagePath,
        identity: ElfIdentity,
        deps: ElfDeps,
        env: &Env,
    ) -> Result<(), PrefetchError> {
        let mut queue = VecDeque::from([(object.clone(), deps)]);
        while let Some((requester, deps)) = queue.pop_front() {
            for name in &deps.needed {
                if self.loaded.contains_key(name) {
                    continue;
                }
                if self.loaded.len() >= MAX_LIBRARIES {
                    self.warnings.push(Warning::LimitReached {
                        what: format!("shared libraries, at `{name}`"),
                    });
                    return Ok(());
                }
                let reason = Reason::SharedLibrary {
                    name: name.clone(),
                    needed_by: requester.clone(),
                };
                let Some(found) =
                    self.load_library(name, &requester, &deps, identity, env, reason)?
                else {
                    self.warnings.push(Warning::LibraryNotFound {
                        name: name.clone(),
                        needed_by: requester.clone(),
                    });
                    continue;
                };
                if self.loaded_paths.insert(found.clone()) {
                    match elf::inspect(self.view, &found)? {
                        Ok((_, found_deps)) => queue.push_back((found, found_deps)),
                        Err(detail) => self.warnings.push(Warning::BadElf {
                            path: found,
                            detail,
                        }),
                    }
                }
            }
        }
        Ok(())
    }

    /// Finds library `name` for `requester` and adds it; returns its canonical path.
    fn load_library(
        &mut self,
        name: &str,
        requester: &ImagePath,
        requester_deps: &ElfDeps,
        identity: ElfIdentity,
        env: &Env,
        reason: Reason,
    ) -> Result<Option<ImagePath>, PrefetchError> {
        let root = ImagePath::root();
        let candidates: Vec<ImagePath> = if name.contains('/') {
            vec![root.join(name)]
        } else {
            self.library_dirs(requester, requester_deps, identity, env)?
                .into_iter()
                .map(|dir| dir.join(name))
                .collect()
        };
        for candidate in candidates {
            let resolution = resolve(self.view, &root, candidate.as_str(), true)?;
            if !resolution.info.as_ref().is_some_and(FileInfo::is_file) {
                continue;
            }
            // ld.so skips libraries of another class or machine and keeps searching.
            let header = self.view.read(&resolution.path, 64)?;
            if elf::identity(&header) != Some(identity) {
                continue;
            }
            self.add_links(&resolution, name);
            self.add(&resolution.path, PrefetchKind::File, reason);
            self.loaded.insert(name.to_owned(), resolution.path.clone());
            if name.contains('/') {
                // A library loaded by path also satisfies DT_NEEDED entries naming it.
                let file_name = ImagePath::new(name).file_name().to_owned();
                self.loaded
                    .entry(file_name)
                    .or_insert(resolution.path.clone());
            }
            return Ok(Some(resolution.path));
        }
        Ok(None)
    }

    /// The directories searched for a library requested by `requester`, in order.
    fn library_dirs(
        &mut self,
        requester: &ImagePath,
        deps: &ElfDeps,
        identity: ElfIdentity,
        env: &Env,
    ) -> Result<Vec<ImagePath>, PrefetchError> {
        let root = ImagePath::root();
        let flavor = self.main.as_ref().map_or(LoaderFlavor::Glibc, |m| m.flavor);
        let expand = |dirs: &[String], object: &ImagePath| -> Vec<ImagePath> {
            dirs.iter()
                .flat_map(|dir| elf::expand_search_dir(dir, &object.parent(), identity))
                .map(|dir| root.join(&dir))
                .collect()
        };
        let ld_library_path: Vec<ImagePath> = env
            .get("LD_LIBRARY_PATH")
            .map(|list| {
                list.split([':', ';'])
                    .filter(|d| !d.is_empty())
                    .map(|d| root.join(d))
                    .collect()
            })
            .unwrap_or_default();
        let mut dirs = Vec::new();
        match flavor {
            LoaderFlavor::Glibc => {
                if deps.runpath.is_empty() {
                    dirs.extend(expand(&deps.rpath, requester));
                    if let Some(main) = &self.main {
                        dirs.extend(expand(&main.rpath, &main.path));
                    }
                }
                dirs.extend(ld_library_path);
                dirs.extend(expand(&deps.runpath, requester));
                // ld.so consults /etc/ld.so.cache, which ldconfig builds from these.
                dirs.extend(self.ld_conf_dirs()?);
                if !deps.nodeflib {
                    dirs.extend(identity.default_dirs());
                }
            }
            LoaderFlavor::Musl => {
                dirs.extend(ld_library_path);
                dirs.extend(expand(&deps.rpath, requester));
                dirs.extend(expand(&deps.runpath, requester));
                let path_file =
                    ImagePath::new(&format!("/etc/ld-musl-{}.path", identity.musl_arch()));
                let resolution = resolve(self.view, &root, path_file.as_str(), true)?;
                if resolution.info.as_ref().is_some_and(FileInfo::is_file) {
                    let text = self.view.read(&resolution.path, MAX_CONFIG_BYTES)?;
                    dirs.extend(
                        String::from_utf8_lossy(&text)
                            .split([':', '\n'])
                            .map(str::trim)
                            .filter(|d| !d.is_empty())
                            .map(|d| root.join(d)),
                    );
                } else {
                    dirs.extend(["/lib", "/usr/local/lib", "/usr/lib"].map(ImagePath::new));
                }
            }
        }
        let mut seen = HashSet::new();
        dirs.retain(|dir| seen.insert(dir.clone()));
        Ok(dirs)
    }

    /// The directories `/etc/ld.so.conf` (with its `include`s) lists.
    fn ld_conf_dirs(&mut self) -> Result<Vec<ImagePath>, PrefetchError> {
        if let Some(dirs) = &self.ld_conf_dirs {
            return Ok(dirs.clone());
        }
        let mut dirs = Vec::new();
        self.read_ld_conf(&ImagePath::new("/etc/ld.so.conf"), 0, &mut dirs)?;
        self.ld_conf_dirs = Some(dirs.clone());
        Ok(dirs)
    }

    fn read_ld_conf(
        &mut self,
        file: &ImagePath,
        depth: usize,
        dirs: &mut Vec<ImagePath>,
    ) -> Result<(), PrefetchError> {
        if depth > MAX_LD_CONF_DEPTH {
            return Ok(());
        }
        let root = ImagePath::root();
        let resolution = resolve(self.view, &root, file.as_str(), true)?;
        if !resolution.info.as_ref().is_some_and(FileInfo::is_file) {
            return Ok(());
        }
        let text = self.view.read(&resolution.path, MAX_CONFIG_BYTES)?;
        let text = String::from_utf8_lossy(&text).into_owned();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if let Some(patterns) = line.strip_prefix("include") {
                if !patterns.starts_with([' ', '\t']) {
                    continue;
                }
                for pattern in patterns.split_whitespace() {
                    let pattern = file.parent().join(pattern);
                    for included in self.glob(&pattern)? {
                        self.read_ld_conf(&included, depth + 1, dirs)?;
                    }
                }
            } else if line.starts_with("hwcap") {
                continue;
            } else {
                for dir in line.split([' ', '\t', ':', ',']).filter(|d| !d.is_empty()) {
                    // Old ldconfig syntax: `DIR=TYPE`.
                    let dir = dir.split('=').next().unwrap_or(dir);
                    dirs.push(root.join(dir));
                }
            }
        }
        Ok(())
    }

    /// Paths matching `pattern` (`*`, `?` and `[...]` in any component), sorted.
    fn glob(&mut self, pattern: &ImagePath) -> Result<Vec<ImagePath>, PrefetchError> {
        let mut matches = vec![ImagePath::root()];
        for component in pattern.components() {
            let mut next = Vec::new();
            for base in &matches {
                if !component.contains(['*', '?', '[']) {
                    next.push(base.join(component));
                    continue;
                }
                if let Some(names) = self.list_dir(base)? {
                    for name in names.iter() {
                        if !name.starts_with('.') && wildcard_match(component, name) {
                            next.push(base.join(name));
                        }
                    }
                }
            }
            matches = next;
        }
        matches.sort();
        Ok(matches)
    }
}

/// `#!INTERPRETER [ONE ARGUMENT]` as the kernel splits it.
fn parse_shebang(rest: &[u8]) -> Option<(String, Option<String>)> {
    let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = String::from_utf8_lossy(&rest[..line_end]);
    let line = line.trim_matches([' ', '\t', '\r']);
    if line.is_empty() {
        return None;
    }
    let (interpreter, arg) = match line.split_once([' ', '\t']) {
        Some((interpreter, arg)) => {
            let arg = arg.trim_matches([' ', '\t']);
            (interpreter, (!arg.is_empty()).then(|| arg.to_owned()))
        }
        None => (line, None),
    };
    Some((interpreter.to_owned(), arg))
}

/// `python`, `python3`, `python3.12`, `python3.12d`...
fn is_python_name(name: &str) -> bool {
    let Some(version) = name.strip_prefix("python") else {
        return false;
    };
    version
        .trim_end_matches(['d', 'm', 't'])
        .chars()
        .all(|c| c.is_ascii_digit() || c == '.')
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// For programs whose job is to run another command, that command.
fn wrapped_command<'a>(name: &str, args: &'a [String]) -> Option<&'a [String]> {
    // (options that take a value, positional arguments before the command)
    let (value_options, positional): (&[&str], usize) = match name {
        "nohup" | "setsid" => (&[], 0),
        "tini" | "tini-static" | "docker-init" => (&["-e", "-p"], 0),
        "dumb-init" => (&["-r", "--rewrite"], 0),
        "gosu" | "su-exec" => (&[], 1),
        "nice" => (&["-n", "--adjustment"], 0),
        "timeout" => (&["-s", "--signal", "-k", "--kill-after"], 1),
        "stdbuf" => (&["-i", "-o", "-e"], 0),
        "chroot" => (&[], 1),
        _ => return None,
    };
    let mut index = 0;
    while let Some(arg) = args.get(index) {
        if arg == "--" {
            index += 1;
            break;
        }
        if !arg.starts_with('-') || arg.len() == 1 {
            break;
        }
        index += if value_options.contains(&arg.as_str()) {
            2
        } else {
            1
        };
    }
    args.get(index + positional..).or(Some(&[]))
}

/// Shell-style wildcard match of one path component.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    fn matches(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|skip| matches(&p[1..], &n[skip..])),
            Some('?') => !n.is_empty() && matches(&p[1..], &n[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else {
                    return n.first() == Some(&'[') && matches(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else {
                    return false;
                };
                let (negate, set) = match p[1] {
                    '!' | '^' => (true, &p[2..close]),
                    _ => (false, &p[1..close]),
                };
                let mut found = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        found |= set[i] <= c && c <= set[i + 2];
                        i += 3;
                    } else {
                        found |= set[i] == c;
                        i += 1;
                    }
                }
                found != negate && matches(&p[close + 1..], &n[1..])
            }
            Some(&literal) => n.first() == Some(&literal) && matches(&p[1..], &n[1..]),
        }
    }
    matches(&pattern, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_lines_split_like_the_kernel() {
        assert_eq!(
            parse_shebang(b"/usr/bin/env python3\nimport x"),
            Some(("/usr/bin/env".to_owned(), Some("python3".to_owned())))
        );
        assert_eq!(
            parse_shebang(b" /bin/sh -e -x \n"),
            Some(("/bin/sh".to_owned(), Some("-e -x".to_owned())))
        );
        assert_eq!(
            parse_shebang(b"/bin/bash\r\n"),
            Some(("/bin/bash".to_owned(), None))
        );
        assert_eq!(parse_shebang(b"   \n"), None);
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.conf", "libc.conf"));
        assert!(!wildcard_match("*.conf", "libc.conf.bak"));
        assert!(wildcard_match("lib?.so", "libc.so"));
        assert!(wildcard_match("[a-c]x", "bx"));
        assert!(!wildcard_match("[!a-c]x", "bx"));
    }

    #[test]
    fn python_names() {
        assert!(is_python_name("python3.11"));
        assert!(is_python_name("python"));
        assert!(is_python_name("python3"));
        assert!(!is_python_name("python3-config"));
        assert!(!is_python_name("pythonista"));
    }

    #[test]
    fn wrappers_yield_their_command() {
        let args = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let tini = args(&["-s", "--", "python", "app.py"]);
        assert_eq!(wrapped_command("tini", &tini).unwrap(), &tini[2..]);
        let gosu = args(&["app", "node", "x.js"]);
        assert_eq!(wrapped_command("gosu", &gosu).unwrap(), &gosu[1..]);
        let timeout = args(&["-s", "KILL", "10", "sleep", "1"]);
        assert_eq!(wrapped_command("timeout", &timeout).unwrap(), &timeout[3..]);
        assert!(wrapped_command("nginx", &tini).is_none());
    }
}

//! Static prefetch lists: which files a container's start will read, computed from
//! the image's root filesystem and config without running anything.
//!
//! The converter places these files first in each layer (before the prefetch
//! landmark) and sluice fetches them before the container starts. See
//! `docs/prefetch.md` for what the analysis covers and what it cannot see.
//!
//! The input is an [`ImageView`], the merged filesystem of the image: [`DirView`]
//! over an unpacked rootfs, or [`LayerStackView`] over layers' entry lists. The
//! analysis, [`analyze_entrypoint`], follows what the kernel and the program's
//! loaders do at start: the `PATH` lookup, every symlink on the way, `#!`
//! interpreters, the ELF dynamic loader and the `DT_NEEDED` closure, the script an
//! interpreter is handed, and for Python the import graph.

mod analyze;
mod elf;
mod layers;
mod path;
mod python;
mod shell;
mod view;

#[cfg(test)]
mod host_tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use analyze::analyze_entrypoint;
pub use layers::{
    LayerContent, LayerEntries, LayerEntry, LayerEntryKind, LayerPosition, LayerStackView,
    layer_entries_from_index,
};
pub use path::ImagePath;
pub use view::{
    DirView, FileInfo, FileKind, ImageView, MAX_SYMLINKS, Resolution, ResolveFailure, resolve,
};

/// Reading the image failed. Not finding something is never an error: the analysis
/// reports it as a [`Warning`] and goes on.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error(
        "cannot use {root} as an image root: {source}; pass the directory of an unpacked rootfs"
    )]
    RootDir {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} in the rootfs at {root}: {source}; check that the rootfs is readable")]
    Dir {
        root: PathBuf,
        path: ImagePath,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} from layer {layer} of the image: {source}")]
    Layer {
        layer: LayerPosition,
        path: ImagePath,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file in the image, so it has no content to read")]
    NotAFile { path: ImagePath },
}

/// The parts of an OCI image config that decide what a container's start runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfigInfo {
    /// `config.Entrypoint`; shell form is already `["/bin/sh", "-c", "..."]`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`, appended to the entrypoint.
    pub cmd: Vec<String>,
    /// `config.WorkingDir`; empty means `/`.
    pub working_dir: String,
    /// `config.Env`, as `NAME=VALUE` strings.
    pub env: Vec<String>,
}

impl ImageConfigInfo {
    /// Reads the fields from an OCI image config blob
    /// (`application/vnd.oci.image.config.v1+json`, or Docker's equivalent).
    /// Absent and `null` fields are empty.
    pub fn from_oci_config(json: &[u8]) -> Result<ImageConfigInfo, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Blob {
            #[serde(default)]
            config: Option<Fields>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Fields {
            #[serde(default)]
            entrypoint: Option<Vec<String>>,
            #[serde(default)]
            cmd: Option<Vec<String>>,
            #[serde(default)]
            working_dir: Option<String>,
            #[serde(default)]
            env: Option<Vec<String>>,
        }
        let blob: Blob = serde_json::from_slice(json)?;
        let Some(fields) = blob.config else {
            return Ok(ImageConfigInfo::default());
        };
        Ok(ImageConfigInfo {
            entrypoint: fields.entrypoint.unwrap_or_default(),
            cmd: fields.cmd.unwrap_or_default(),
            working_dir: fields.working_dir.unwrap_or_default(),
            env: fields.env.unwrap_or_default(),
        })
    }
}

/// What kind of entry a prefetched path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PrefetchKind {
    File,
    /// Read by the kernel's path walk; it has no content, but placing its entry early
    /// keeps the walk from waiting on a later part of the layer.
    Symlink,
}

/// What a Python module file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ModuleFile {
    /// The `.py` source: stat'ed always, read when there is no valid bytecode.
    Source,
    /// `__pycache__/NAME.cpython-3X.pyc`: what CPython reads when it is up to date.
    Bytecode,
    /// A C extension module (`.so`).
    Extension,
}

/// Why a path is in the list; for debugging the analysis.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Reason {
    /// Read by the runtime (runc) before the entrypoint runs: user and group lookup,
    /// also used to set `HOME`.
    RuntimeSetup,
    /// The program `execve` runs for this command word.
    Executable { command: String },
    /// A symlink the kernel reads while resolving `resolving`.
    Symlink { resolving: String },
    /// The `#!` interpreter of `script`.
    ScriptInterpreter { script: ImagePath },
    /// The ELF program interpreter (`PT_INTERP`) of `program`.
    DynamicLoader { program: ImagePath },
    /// Read by the dynamic loader at every start (`/etc/ld.so.cache`, `/etc/ld.so.preload`).
    LoaderConfig,
    /// Named in `/etc/ld.so.preload` or `LD_PRELOAD`.
    Preload { name: String },
    /// A `DT_NEEDED` entry (`name`) of `needed_by`.
    SharedLibrary { name: String, needed_by: ImagePath },
    /// The file an interpreter (or any program) is handed on its command line.
    CommandArgument { program: ImagePath },
    /// Read by the C library's locale setup.
    Locale,
    /// A module of the Python import graph, reached from `imported_by`.
    PythonModule {
        module: String,
        file: ModuleFile,
        imported_by: String,
    },
    /// Read by CPython's `site` at start: `pyvenv.cfg`, `.pth` files.
    PythonSite,
    /// A data file that `wanted_by` (a module) opens when imported.
    ModuleData { wanted_by: String },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::RuntimeSetup => f.write_str("read by the runtime to set up the process user"),
            Reason::Executable { command } => write!(f, "executable for `{command}`"),
            Reason::Symlink { resolving } => write!(f, "symlink on the way to `{resolving}`"),
            Reason::ScriptInterpreter { script } => write!(f, "#! interpreter of {script}"),
            Reason::DynamicLoader { program } => write!(f, "dynamic loader of {program}"),
            Reason::LoaderConfig => f.write_str("read by the dynamic loader at start"),
            Reason::Preload { name } => write!(f, "preloaded library `{name}`"),
            Reason::SharedLibrary { name, needed_by } => {
                write!(f, "`{name}` needed by {needed_by}")
            }
            Reason::CommandArgument { program } => write!(f, "file argument of {program}"),
            Reason::Locale => f.write_str("C library locale data"),
            Reason::PythonModule {
                module,
                file,
                imported_by,
            } => write!(
                f,
                "python module `{module}` ({file:?}) imported by {imported_by}"
            ),
            Reason::PythonSite => f.write_str("read by python's site initialization"),
            Reason::ModuleData { wanted_by } => write!(f, "data file opened by `{wanted_by}`"),
        }
    }
}

/// One path to prefetch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchEntry {
    pub path: ImagePath,
    pub kind: PrefetchKind,
    pub reason: Reason,
}

/// Something the analysis could not resolve; the list holds what it could.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Warning {
    /// Entrypoint and Cmd are both empty: the runtime has nothing to start.
    EmptyCommand,
    /// A command word names no executable in the image.
    CommandNotFound { command: String },
    /// A path named by the image does not resolve.
    Unresolved {
        path: String,
        failure: ResolveFailure,
        context: String,
    },
    /// An executable that is neither ELF nor a `#!` script.
    UnknownExecutable { path: ImagePath },
    /// An ELF file whose headers could not be parsed.
    BadElf { path: ImagePath, detail: String },
    /// A `DT_NEEDED` library that no search directory holds.
    LibraryNotFound { name: String, needed_by: ImagePath },
    /// A shell command the analysis does not follow (expansions, unknown syntax).
    ShellCommandSkipped { command: String, why: String },
    /// No Python standard library was found for this interpreter.
    PythonStdlibNotFound { interpreter: ImagePath },
    /// Imported modules not found as files: built into the interpreter, or missing.
    PythonModulesNotFound { modules: Vec<String> },
    /// A bound was reached; the list is cut there.
    LimitReached { what: String },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::EmptyCommand => f.write_str("the image has neither Entrypoint nor Cmd"),
            Warning::CommandNotFound { command } => {
                write!(f, "`{command}` is not an executable in the image")
            }
            Warning::Unresolved {
                path,
                failure,
                context,
            } => write!(f, "{path} ({context}) does not resolve: {failure}"),
            Warning::UnknownExecutable { path } => {
                write!(f, "{path} is neither an ELF file nor a #! script")
            }
            Warning::BadElf { path, detail } => write!(f, "cannot parse ELF {path}: {detail}"),
            Warning::LibraryNotFound { name, needed_by } => {
                write!(f, "library `{name}` needed by {needed_by} not found")
            }
            Warning::ShellCommandSkipped { command, why } => {
                write!(f, "shell command `{command}` not followed: {why}")
            }
            Warning::PythonStdlibNotFound { interpreter } => {
                write!(f, "no python standard library found for {interpreter}")
            }
            Warning::PythonModulesNotFound { modules } => write!(
                f,
                "python modules not found as files (built in, or missing): {}",
                modules.join(", ")
            ),
            Warning::LimitReached { what } => write!(f, "limit reached: {what}"),
        }
    }
}

/// The ordered, de-duplicated paths a container's start reads, in the order the
/// start reads them as far as the analysis can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchList {
    pub entries: Vec<PrefetchEntry>,
    pub warnings: Vec<Warning>,
}

impl PrefetchList {
    pub fn paths(&self) -> impl Iterator<Item = &ImagePath> {
        self.entries.iter().map(|entry| &entry.path)
    }

    pub fn contains(&self, path: &str) -> bool {
        self.paths().any(|p| p.as_str() == path)
    }

    /// The regular files, in order (without the symlinks walked to reach them).
    pub fn files(&self) -> impl Iterator<Item = &ImagePath> {
        self.entries
            .iter()
            .filter(|entry| entry.kind == PrefetchKind::File)
            .map(|entry| &entry.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_oci_config_blob() {
        let blob = br#"{"architecture":"amd64","os":"linux","config":{
            "Env":["PATH=/usr/local/bin:/usr/bin","LANG=C.UTF-8"],
            "Entrypoint":null,"Cmd":["python3","app.py"],"WorkingDir":"/srv"}}"#;
        let config = ImageConfigInfo::from_oci_config(blob).unwrap();
        assert_eq!(config.entrypoint, Vec::<String>::new());
        assert_eq!(config.cmd, vec!["python3", "app.py"]);
        assert_eq!(config.working_dir, "/srv");
        assert_eq!(config.env.len(), 2);
        let bare = ImageConfigInfo::from_oci_config(br#"{"os":"linux"}"#).unwrap();
        assert_eq!(bare, ImageConfigInfo::default());
        assert!(ImageConfigInfo::from_oci_config(b"not json").is_err());
    }
}

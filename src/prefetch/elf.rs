//! The parts of an ELF file the dynamic loader reads: class and machine, the
//! program interpreter, and the dynamic section's library names and search paths.
//! Only the pieces needed are read from the view (headers, `PT_INTERP`,
//! `PT_DYNAMIC`, the dynamic string table), never the whole file.

use goblin::container::{Container, Ctx};
use goblin::elf::dynamic::{DF_1_NODEFLIB, DT_FLAGS_1, DT_NEEDED, DT_RPATH, DT_RUNPATH};
use goblin::elf::header::{EM_386, EM_AARCH64, EM_ARM, EM_PPC64, EM_RISCV, EM_S390, EM_X86_64};
use goblin::elf::program_header::{PT_DYNAMIC, PT_INTERP};
use goblin::elf::{Dynamic, Elf, ProgramHeader};

use super::view::ImageView;
use super::{ImagePath, PrefetchError};

/// Bounds on what a (possibly hostile) header may make us read.
const MAX_PROGRAM_HEADERS_BYTES: usize = 64 * 1024;
const MAX_INTERP_BYTES: usize = 4096;
const MAX_DYNAMIC_BYTES: usize = 1024 * 1024;
const MAX_STRTAB_BYTES: usize = 4 * 1024 * 1024;

pub(crate) const ELF_MAGIC: &[u8] = b"\x7fELF";

/// What the loader needs to match a library against the program loading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ElfIdentity {
    pub is_64: bool,
    pub machine: u16,
}

impl ElfIdentity {
    /// The Debian multiarch triplet for `$LIB` and the default directories.
    pub fn triplet(self) -> Option<&'static str> {
        Some(match (self.machine, self.is_64) {
            (EM_X86_64, true) => "x86_64-linux-gnu",
            (EM_AARCH64, true) => "aarch64-linux-gnu",
            (EM_386, false) => "i386-linux-gnu",
            (EM_ARM, false) => "arm-linux-gnueabihf",
            (EM_PPC64, true) => "powerpc64le-linux-gnu",
            (EM_S390, true) => "s390x-linux-gnu",
            (EM_RISCV, true) => "riscv64-linux-gnu",
            _ => return None,
        })
    }

    /// `$PLATFORM` as glibc expands it.
    pub fn platform(self) -> &'static str {
        match (self.machine, self.is_64) {
            (EM_X86_64, true) => "x86_64",
            (EM_AARCH64, true) => "aarch64",
            (EM_386, false) => "i686",
            (EM_ARM, false) => "v7l",
            (EM_PPC64, true) => "power8",
            (EM_S390, true) => "z900",
            (EM_RISCV, true) => "riscv64",
            _ => "",
        }
    }

    /// Candidates for `$LIB`, most specific first (distributions build glibc with
    /// different values; the first one that holds the library wins).
    pub fn lib_expansions(self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(triplet) = self.triplet() {
            out.push(format!("lib/{triplet}"));
        }
        out.push(if self.is_64 { "lib64" } else { "lib32" }.to_owned());
        out.push("lib".to_owned());
        out
    }

    /// glibc's trusted directories for this class/machine, as the cache-less loader
    /// (and ldconfig's multiarch configuration) searches them.
    pub fn default_dirs(self) -> Vec<ImagePath> {
        let mut dirs = Vec::new();
        if let Some(triplet) = self.triplet() {
            dirs.push(format!("/lib/{triplet}"));
            dirs.push(format!("/usr/lib/{triplet}"));
        }
        if self.is_64 {
            dirs.push("/lib64".to_owned());
            dirs.push("/usr/lib64".to_owned());
        } else {
            dirs.push("/lib32".to_owned());
            dirs.push("/usr/lib32".to_owned());
        }
        dirs.push("/lib".to_owned());
        dirs.push("/usr/lib".to_owned());
        dirs.iter().map(|d| ImagePath::new(d)).collect()
    }

    /// musl's `ld-musl-ARCH` name part.
    pub fn musl_arch(self) -> &'static str {
        match (self.machine, self.is_64) {
            (EM_X86_64, true) => "x86_64",
            (EM_AARCH64, true) => "aarch64",
            (EM_386, false) => "i386",
            (EM_ARM, false) => "armhf",
            (EM_PPC64, true) => "powerpc64le",
            (EM_S390, true) => "s390x",
            (EM_RISCV, true) => "riscv64",
            _ => "",
        }
    }
}

/// The dynamic-linking facts of one ELF file.
#[derive(Debug, Clone, Default)]
pub(crate) struct ElfDeps {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
    /// `DF_1_NODEFLIB`: the default directories are not searched for its libraries.
    pub nodeflib: bool,
}

/// The class and machine of an ELF file, or `None` when `header` is not ELF.
pub(crate) fn identity(header: &[u8]) -> Option<ElfIdentity> {
    if header.len() < goblin::elf::header::header32::SIZEOF_EHDR || !header.starts_with(ELF_MAGIC) {
        return None;
    }
    let parsed = Elf::parse_header(header).ok()?;
    Some(ElfIdentity {
        is_64: parsed.container().ok()? == Container::Big,
        machine: parsed.e_machine,
    })
}

/// Reads the dynamic-linking facts of the ELF file at `path`. The inner `Err` is a
/// description of why the file is not usable ELF (not an I/O failure).
pub(crate) fn inspect(
    view: &dyn ImageView,
    path: &ImagePath,
) -> Result<Result<(ElfIdentity, ElfDeps), String>, PrefetchError> {
    let header_bytes = view.read(path, goblin::elf::header::header64::SIZEOF_EHDR)?;
    let Some(identity) = identity(&header_bytes) else {
        return Ok(Err("not an ELF header".to_owned()));
    };
    let header = match Elf::parse_header(&header_bytes) {
        Ok(header) => header,
        Err(err) => return Ok(Err(err.to_string())),
    };
    let (container, endian) = match (header.container(), header.endianness()) {
        (Ok(c), Ok(e)) => (c, e),
        _ => return Ok(Err("bad class or byte order".to_owned())),
    };
    let ctx = Ctx::new(container, endian);
    let ph_bytes = usize::from(header.e_phnum) * usize::from(header.e_phentsize);
    if ph_bytes > MAX_PROGRAM_HEADERS_BYTES {
        return Ok(Err(format!("{ph_bytes} bytes of program headers")));
    }
    let ph_buf = view.read_at(path, header.e_phoff, ph_bytes)?;
    let phdrs = match ProgramHeader::parse(&ph_buf, 0, usize::from(header.e_phnum), ctx) {
        Ok(phdrs) => phdrs,
        Err(err) => return Ok(Err(format!("program headers: {err}"))),
    };
    let mut deps = ElfDeps::default();
    if let Some(interp) = phdrs.iter().find(|p| p.p_type == PT_INTERP) {
        let len = usize::try_from(interp.p_filesz)
            .unwrap_or(usize::MAX)
            .min(MAX_INTERP_BYTES);
        let bytes = view.read_at(path, interp.p_offset, len)?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let name = String::from_utf8_lossy(&bytes[..end]).into_owned();
        if !name.is_empty() {
            deps.interpreter = Some(name);
        }
    }
    let Some(dynamic_index) = phdrs.iter().position(|p| p.p_type == PT_DYNAMIC) else {
        return Ok(Ok((identity, deps)));
    };
    let dynamic_phdr = &phdrs[dynamic_index];
    let len = usize::try_from(dynamic_phdr.p_filesz)
        .unwrap_or(usize::MAX)
        .min(MAX_DYNAMIC_BYTES);
    let dyn_buf = view.read_at(path, dynamic_phdr.p_offset, len)?;
    // goblin reads the dynamic array at its file offset; only that segment was read,
    // so present it at offset 0. Address-to-offset mapping uses the PT_LOADs, untouched.
    let mut shifted = phdrs.clone();
    shifted[dynamic_index].p_offset = 0;
    shifted[dynamic_index].p_filesz = dyn_buf.len() as u64;
    let dynamic = match Dynamic::parse(&dyn_buf, &shifted, ctx) {
        Ok(Some(dynamic)) => dynamic,
        Ok(None) => return Ok(Ok((identity, deps))),
        Err(err) => return Ok(Err(format!("dynamic section: {err}"))),
    };
    let strsz = dynamic.info.strsz.min(MAX_STRTAB_BYTES);
    let strtab = if dynamic.info.strtab == 0 || strsz == 0 {
        Vec::new()
    } else {
        view.read_at(path, dynamic.info.strtab as u64, strsz)?
    };
    let string_at = |offset: u64| -> Option<String> {
        let start = usize::try_from(offset).ok()?;
        let rest = strtab.get(start..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    let split_paths = |list: String| -> Vec<String> {
        list.split(':')
            .filter(|dir| !dir.is_empty())
            .map(str::to_owned)
            .collect()
    };
    for entry in &dynamic.dyns {
        match entry.d_tag {
            DT_NEEDED => deps.needed.extend(string_at(entry.d_val)),
            DT_RPATH => deps
                .rpath
                .extend(string_at(entry.d_val).map(split_paths).unwrap_or_default()),
            DT_RUNPATH => deps
                .runpath
                .extend(string_at(entry.d_val).map(split_paths).unwrap_or_default()),
            DT_FLAGS_1 => deps.nodeflib = entry.d_val & DF_1_NODEFLIB != 0,
            _ => {}
        }
    }
    Ok(Ok((identity, deps)))
}

/// Expands `$ORIGIN`, `$LIB` and `$PLATFORM` (also in `${...}` form) in one
/// RPATH/RUNPATH element; `$LIB` may yield several candidates.
pub(crate) fn expand_search_dir(
    dir: &str,
    origin: &ImagePath,
    identity: ElfIdentity,
) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut rest = dir;
    while let Some(at) = rest.find('$') {
        for candidate in &mut out {
            candidate.push_str(&rest[..at]);
        }
        let after = &rest[at + 1..];
        let (name, consumed) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let replacements: Vec<String> = match name {
            "ORIGIN" => vec![origin.as_str().to_owned()],
            "PLATFORM" => vec![identity.platform().to_owned()],
            "LIB" => identity.lib_expansions(),
            // glibc drops a path element with an unknown token.
            _ => return Vec::new(),
        };
        out = out
            .iter()
            .flat_map(|prefix| replacements.iter().map(move |r| format!("{prefix}{r}")))
            .collect();
        rest = &after[consumed..];
    }
    for candidate in &mut out {
        candidate.push_str(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86_64: ElfIdentity = ElfIdentity {
        is_64: true,
        machine: EM_X86_64,
    };

    #[test]
    fn expands_origin_lib_and_platform() {
        let origin = ImagePath::new("/opt/app/bin");
        assert_eq!(
            expand_search_dir("$ORIGIN/../lib", &origin, X86_64),
            vec!["/opt/app/bin/../lib"]
        );
        assert_eq!(
            expand_search_dir("${ORIGIN}/x", &origin, X86_64),
            vec!["/opt/app/bin/x"]
        );
        assert_eq!(
            expand_search_dir("/usr/$LIB/$PLATFORM", &origin, X86_64),
            vec![
                "/usr/lib/x86_64-linux-gnu/x86_64",
                "/usr/lib64/x86_64",
                "/usr/lib/x86_64",
            ]
        );
        assert!(expand_search_dir("$UNKNOWN/lib", &origin, X86_64).is_empty());
        assert_eq!(expand_search_dir("/plain", &origin, X86_64), vec!["/plain"]);
    }

    /// Truncated and corrupted copies of a real program never panic the parser.
    #[test]
    fn damaged_elf_files_are_reported_not_fatal() {
        use crate::prefetch::DirView;
        let original = std::fs::read("/usr/bin/env").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let view = DirView::new(dir.path()).unwrap();
        let path = ImagePath::new("/prog");
        let (identity, deps) = {
            std::fs::write(dir.path().join("prog"), &original).unwrap();
            inspect(&view, &path).unwrap().unwrap()
        };
        assert_eq!(identity.machine, EM_X86_64);
        assert!(deps.interpreter.is_some());
        assert!(deps.needed.iter().any(|n| n == "libc.so.6"));
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rejected = 0;
        for round in 0..300usize {
            let mut bytes = original.clone();
            if round % 3 == 0 {
                bytes.truncate((round * 37) % 8192);
            } else {
                for _ in 0..(1 + round % 16) {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    // Corrupt the headers and the start of the file, where the tables live.
                    let at = (seed >> 33) as usize % 4096;
                    bytes[at] = (seed >> 13) as u8;
                }
            }
            std::fs::write(dir.path().join("prog"), &bytes).unwrap();
            // Any outcome but a panic or an I/O error is fine.
            if inspect(&view, &path).unwrap().is_err() {
                rejected += 1;
            }
        }
        assert!(rejected > 0, "truncated headers must be rejected");
    }

    #[test]
    fn garbage_is_not_elf() {
        assert_eq!(identity(b"#!/bin/sh\n"), None);
        assert_eq!(identity(&[0x7f, b'E', b'L', b'F', 9, 9, 9]), None);
    }
}

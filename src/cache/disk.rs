//! Verified chunks on disk, content-addressed by chunk digest:
//! `<dir>/chunks/<first two hex digits>/<hex>`.
//!
//! A chunk file only ever appears through `rename` of a fully written temp file in
//! the same directory, so readers never see a partial chunk; temp files left by a
//! crash are removed on open. Reads re-verify the digest so that a file damaged after
//! a power loss (rename without fsync) is dropped and fetched again, never served.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::Digest;

const TEMP_PREFIX: &str = ".tmp-";

#[derive(Clone)]
pub(crate) struct DiskStore {
    root: PathBuf,
}

impl DiskStore {
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        let root = dir.join("chunks");
        fs::create_dir_all(&root)?;
        for fanout in fs::read_dir(&root)? {
            let fanout = fanout?;
            if !fanout.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(fanout.path())? {
                let file = file?;
                if file
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes())
                {
                    fs::remove_file(file.path())?;
                }
            }
        }
        Ok(Self { root })
    }

    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The verified chunk, or `None` when it is absent or damaged (a damaged file is
    /// removed so the next fetch replaces it).
    pub(crate) fn read(&self, digest: &Digest, size: u64) -> io::Result<Option<Vec<u8>>> {
        let path = self.path(digest);
        let mut file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut data)?;
        if data.len() as u64 != size || !digest.matches(&data) {
            tracing::warn!(
                file = %path.display(),
                chunk = %digest,
                "cached chunk is damaged; removing it so it is fetched again"
            );
            fs::remove_file(&path)?;
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Store verified chunk bytes. Concurrent writers of the same chunk are harmless:
    /// each renames its own complete temp file over the same name.
    pub(crate) fn write(&self, digest: &Digest, data: &[u8]) -> io::Result<()> {
        let path = self.path(digest);
        if path.is_file() {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir)?;
        let temp = dir.join(format!(
            "{TEMP_PREFIX}{}-{:016x}",
            digest.hex(),
            rand::random::<u64>()
        ));
        let result = fs::File::create(&temp)
            .and_then(|mut file| file.write_all(data))
            .and_then(|()| fs::rename(&temp, &path));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Where a temp file for `digest` would live; tests use it to plant torn writes.
    #[cfg(test)]
    pub(crate) fn temp_path_for_test(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(&hex[..2])
            .join(format!("{TEMP_PREFIX}{hex}-torn"))
    }
}

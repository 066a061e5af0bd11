//! The benchmark images: built by tools/mkbenchimages, converted to eStargz with and
//! without the entrypoint's files first by `sluice convert`, and pushed once into a
//! registry storage directory kept under the image cache. Benchmark registries serve
//! that directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::procs::{Daemons, Registry};
use super::{BenchError, command_output};
use crate::format::{EntryKind, LayerIndex, MAX_FOOTER_SIZE, parse_footer, parse_toc};

/// Repository path of image `name` in the benchmark registry.
pub fn repository(name: &str) -> String {
    format!("bench/{name}")
}

/// The three variants pushed per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The original tar+gzip layers.
    Gzip,
    /// eStargz, no prefetch list (`sluice convert --prefetch none`).
    Estargz,
    /// eStargz with the entrypoint's files first and a `.prefetch.landmark`
    /// (`sluice convert --prefetch entrypoint`).
    EstargzPrefetch,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Gzip, Variant::Estargz, Variant::EstargzPrefetch];

    pub fn tag(self) -> &'static str {
        match self {
            Variant::Gzip => "gzip",
            Variant::Estargz => "esgz",
            Variant::EstargzPrefetch => "esgz-prefetch",
        }
    }

    /// `sluice convert --prefetch` for the converted variants.
    fn prefetch(self) -> Option<&'static str> {
        match self {
            Variant::Gzip => None,
            Variant::Estargz => Some("none"),
            Variant::EstargzPrefetch => Some("entrypoint"),
        }
    }
}

/// How the variants in the storage were made; part of the "pushed" marker, so storage
/// written by another method (e.g. the earlier ctr-remote conversion) is pushed again.
const CONVERSION_METHOD: &str = "gzip: ctr images push; esgz: sluice convert --format estargz --prefetch none; \
     esgz-prefetch: sluice convert --format estargz --prefetch entrypoint";

/// What the report needs to know about one image.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImageFacts {
    /// Compressed bytes of the original image's layers.
    pub compressed_bytes: u64,
    /// Compressed bytes (in the eStargz variant) of the files the entrypoint reads.
    pub read_files_compressed_bytes: u64,
    /// Uncompressed bytes of those files.
    pub read_files_bytes: u64,
    /// How many files the entrypoint reads.
    pub read_files: usize,
    pub layers: usize,
}

/// Where images, converted variants and the registry storage live.
pub struct ImageCache {
    pub dir: PathBuf,
}

impl ImageCache {
    pub fn storage(&self) -> PathBuf {
        self.dir.join("registry")
    }

    fn image_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn pushed_marker(&self, name: &str) -> PathBuf {
        self.dir.join("pushed").join(name)
    }

    /// Build missing images with tools/mkbenchimages, then convert and push those whose
    /// build is newer than what the storage holds.
    pub fn prepare(
        &self,
        names: &[String],
        tools_dir: &Path,
        work_dir: &Path,
    ) -> Result<(), BenchError> {
        std::fs::create_dir_all(self.dir.join("pushed")).map_err(|source| BenchError::Io {
            what: format!("creating {}", self.dir.display()),
            source,
        })?;
        command_output(
            Command::new("python3")
                .arg(tools_dir.join("mkbenchimages"))
                .arg(&self.dir)
                .arg("--images")
                .arg(names.join(",")),
        )?;
        let stale: Vec<&String> = names
            .iter()
            .filter(|name| std::fs::read(self.pushed_marker(name)).ok() != self.marker(name).ok())
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|source| BenchError::Io {
                what: "finding a free loopback port".into(),
                source,
            })?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let setup = work_dir.join("setup");
        std::fs::create_dir_all(&setup).map_err(|source| BenchError::Io {
            what: format!("creating {}", setup.display()),
            source,
        })?;
        let registry = Registry::start(&setup, &self.storage(), addr, addr, None)?;
        let daemons = Daemons::start(
            &setup.join("ctd"),
            None,
            &setup.join("unused-cache"),
            "warn",
        )?;
        for name in stale {
            eprintln!(
                "bench: converting and pushing image {name} (once; cached in {})",
                self.dir.display()
            );
            self.push_variants(&daemons, &registry, name)?;
            std::fs::write(self.pushed_marker(name), self.marker(name)?).map_err(|source| {
                BenchError::Io {
                    what: format!("marking image {name} pushed"),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// What the "pushed" marker of `name` holds once its variants are in the storage:
    /// the built layout's index (a rebuilt image is pushed again) and the conversion
    /// method (a changed method converts again).
    fn marker(&self, name: &str) -> Result<Vec<u8>, BenchError> {
        let mut marker =
            std::fs::read(self.image_dir(name).join("layout/index.json")).map_err(|source| {
                BenchError::Io {
                    what: format!("reading the index of image {name}"),
                    source,
                }
            })?;
        marker.push(b'\n');
        marker.extend_from_slice(CONVERSION_METHOD.as_bytes());
        Ok(marker)
    }

    /// Push the original image with containerd (as it was built), and convert it from
    /// its OCI layout straight into the registry with `sluice convert`, twice.
    fn push_variants(
        &self,
        daemons: &Daemons,
        registry: &Registry,
        name: &str,
    ) -> Result<(), BenchError> {
        let ns = "setup";
        let dir = self.image_dir(name);
        let archive = dir.join("image.tar");
        daemons.ctr(
            ns,
            &[
                "images",
                "import",
                "--no-unpack",
                &archive.to_string_lossy(),
            ],
        )?;
        let remote = |variant: Variant| {
            format!(
                "{}/{}:{}",
                registry.client_addr(),
                repository(name),
                variant.tag()
            )
        };
        let local = format!("bench.local/{name}:{}", Variant::Gzip.tag());
        daemons.ctr(
            ns,
            &["images", "tag", "--force", &local, &remote(Variant::Gzip)],
        )?;
        daemons.ctr(
            ns,
            &["images", "push", "--plain-http", &remote(Variant::Gzip)],
        )?;
        let source = format!(
            "oci:{}:{}",
            dir.join("layout").display(),
            Variant::Gzip.tag()
        );
        let temp = dir.join("convert-tmp");
        for variant in [Variant::Estargz, Variant::EstargzPrefetch] {
            let Some(prefetch) = variant.prefetch() else {
                continue;
            };
            std::fs::create_dir_all(&temp).map_err(|source| BenchError::Io {
                what: format!("creating {}", temp.display()),
                source,
            })?;
            let converted = command_output(
                Command::new(super::procs::sibling_binary("sluice"))
                    .args(["convert", "--format", "estargz", "--prefetch", prefetch])
                    .arg("--plain-http")
                    .arg("--temp-dir")
                    .arg(&temp)
                    .arg(&source)
                    .arg(remote(variant)),
            );
            let _ = std::fs::remove_dir_all(&temp);
            converted?;
        }
        Ok(())
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
            .join("data")
    }

    fn read_json(&self, path: &Path) -> Result<Value, BenchError> {
        let bytes = std::fs::read(path).map_err(|source| BenchError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|error| BenchError::Setup {
            what: format!("image data {}", path.display()),
            reason: format!("not JSON: {error}"),
        })
    }

    /// The (single-platform) manifest of `name:variant` as stored in the registry.
    fn manifest(&self, name: &str, variant: Variant) -> Result<Value, BenchError> {
        let link = self
            .storage()
            .join("docker/registry/v2/repositories")
            .join(repository(name))
            .join("_manifests/tags")
            .join(variant.tag())
            .join("current/link");
        let digest = std::fs::read_to_string(&link).map_err(|source| BenchError::Io {
            what: format!("reading {}", link.display()),
            source,
        })?;
        let mut manifest = self.read_json(&self.blob_path(digest.trim()))?;
        if let Some(first) = manifest["manifests"].as_array().and_then(|m| m.first()) {
            let digest = first["digest"].as_str().unwrap_or_default().to_owned();
            manifest = self.read_json(&self.blob_path(&digest))?;
        }
        Ok(manifest)
    }

    /// Sizes of the image and of what its entrypoint reads.
    pub fn facts(&self, name: &str) -> Result<ImageFacts, BenchError> {
        let gzip = self.manifest(name, Variant::Gzip)?;
        let layers = gzip["layers"].as_array().cloned().unwrap_or_default();
        let mut facts = ImageFacts {
            compressed_bytes: layers.iter().filter_map(|l| l["size"].as_u64()).sum(),
            layers: layers.len(),
            ..ImageFacts::default()
        };
        let record = std::fs::read_to_string(self.image_dir(name).join("record.jsonl")).map_err(
            |source| BenchError::Io {
                what: format!("reading the record of image {name}"),
                source,
            },
        )?;
        let read: Vec<String> = record
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter_map(|v| v["path"].as_str().map(str::to_owned))
            .collect();
        let estargz = self.manifest(name, Variant::Estargz)?;
        let mut indexes = Vec::new();
        for layer in estargz["layers"].as_array().cloned().unwrap_or_default() {
            let digest = layer["digest"].as_str().unwrap_or_default();
            indexes.push(self.layer_index(&self.blob_path(digest))?);
        }
        for path in &read {
            // The topmost layer that has the file is the one the container sees.
            let found = indexes.iter().rev().find_map(|index| {
                index
                    .entries
                    .iter()
                    .find(|entry| entry.name == *path)
                    .map(|entry| (index, entry))
            });
            let Some((index, mut entry)) = found else {
                continue;
            };
            if let EntryKind::Hardlink { target } = entry.kind {
                entry = index.entry(target);
            }
            if let EntryKind::Regular { size, chunks } = &entry.kind {
                facts.read_files += 1;
                facts.read_files_bytes += size;
                facts.read_files_compressed_bytes +=
                    chunks.iter().map(|c| c.compressed_size).sum::<u64>();
            }
        }
        Ok(facts)
    }

    fn layer_index(&self, blob: &Path) -> Result<LayerIndex, BenchError> {
        let data = std::fs::read(blob).map_err(|source| BenchError::Io {
            what: format!("reading layer {}", blob.display()),
            source,
        })?;
        let size = data.len() as u64;
        let tail = &data[data.len().saturating_sub(MAX_FOOTER_SIZE as usize)..];
        let bad = |reason: String| BenchError::Setup {
            what: format!("eStargz layer {}", blob.display()),
            reason,
        };
        let footer = parse_footer(tail, size).map_err(|e| bad(e.to_string()))?;
        let range = footer.toc_range();
        let toc = data
            .get(range.start as usize..range.end as usize)
            .ok_or_else(|| bad("TOC range outside the blob".into()))?;
        Ok(parse_toc(&footer, toc, None, size)
            .map_err(|e| bad(e.to_string()))?
            .index)
    }
}

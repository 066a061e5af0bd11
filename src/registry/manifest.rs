//! Serde types for OCI / Docker schema 2 manifests, indexes and image configs, and picking
//! a platform out of an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

use super::reference::Platform;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header for manifest requests: everything sluice can use.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor: what a manifest says about a blob or another manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Only on index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image manifest (OCI or Docker schema 2: the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index / Docker manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The parts of an image config sluice needs: the platform and the uncompressed layer
/// digests containerd keys snapshots by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

/// A manifest document of either kind, with the media type it was served as.
#[derive(Debug, Clone)]
pub enum ManifestDocument {
    Image {
        media_type: String,
        manifest: ImageManifest,
    },
    Index {
        media_type: String,
        index: ImageIndex,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
    config: Option<serde::de::IgnoredAny>,
}

impl ManifestDocument {
    /// Parses manifest bytes. The `mediaType` field wins over the `Content-Type` header
    /// (some registries serve `application/json`), and the shape decides when neither says.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self, String> {
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
        if probe.schema_version == Some(1) {
            return Err("Docker schema 1 manifests are not supported".into());
        }
        let header_type = content_type
            .map(|t| t.split(';').next().unwrap_or("").trim())
            .filter(|t| !t.is_empty() && *t != "application/json" && *t != "text/plain");
        let media_type = match (probe.media_type.as_deref(), header_type) {
            (Some(t), _) => t.to_owned(),
            (None, Some(t)) => t.to_owned(),
            (None, None) if probe.manifests.is_some() => OCI_INDEX.to_owned(),
            (None, None) if probe.config.is_some() => OCI_MANIFEST.to_owned(),
            (None, None) => return Err("neither an image manifest nor an index".into()),
        };
        match media_type.as_str() {
            OCI_INDEX | DOCKER_MANIFEST_LIST => {
                let index: ImageIndex = serde_json::from_slice(bytes)
                    .map_err(|e| format!("malformed index ({media_type}): {e}"))?;
                Ok(Self::Index { media_type, index })
            }
            OCI_MANIFEST | DOCKER_MANIFEST => {
                let manifest: ImageManifest = serde_json::from_slice(bytes)
                    .map_err(|e| format!("malformed manifest ({media_type}): {e}"))?;
                Ok(Self::Image {
                    media_type,
                    manifest,
                })
            }
            other => Err(format!("unsupported media type {other:?}")),
        }
    }
}

impl ImageIndex {
    /// The entry for `wanted`: an exact variant match is preferred over an entry that
    /// merely matches (e.g. `linux/arm64` picks `arm64/v8` only when no plain entry exists).
    pub fn select(&self, wanted: &Platform) -> Option<&Descriptor> {
        let candidates = self.manifests.iter().filter(|d| {
            matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST)
                && d.platform.as_ref().is_some_and(|p| wanted.matches(p))
        });
        let mut first = None;
        for d in candidates {
            if d.platform.as_ref().map(|p| &p.variant) == Some(&wanted.variant) {
                return Some(d);
            }
            first.get_or_insert(d);
        }
        first
    }

    /// The platforms this index offers, for error messages.
    pub fn platforms(&self) -> String {
        let list: Vec<String> = self
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
            .collect();
        if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":10,
                "platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":11,
                "platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":12,
                "platform":{{"os":"unknown","architecture":"unknown"}},
                "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":13,
                "platform":{{"os":"linux","architecture":"arm","variant":"v6"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":14,
                "platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}}
            ]}}"#,
            d(1),
            d(2),
            d(3),
            d(4),
            d(5)
        )
    }

    #[test]
    fn platform_selection_from_index() {
        let doc = ManifestDocument::parse(index_json().as_bytes(), None).unwrap();
        let ManifestDocument::Index { index, .. } = doc else {
            panic!("expected an index");
        };
        let pick = |p: &str| index.select(&p.parse().unwrap()).map(|d| d.size);
        assert_eq!(pick("linux/amd64"), Some(11));
        assert_eq!(pick("linux/arm64"), Some(10));
        assert_eq!(pick("linux/arm64/v8"), Some(10));
        assert_eq!(pick("linux/arm/v7"), Some(14));
        assert_eq!(pick("linux/arm/v6"), Some(13));
        assert_eq!(pick("linux/s390x"), None);
        assert_eq!(pick("windows/amd64"), None);
        assert!(index.platforms().contains("linux/arm64/v8"));
    }

    #[test]
    fn media_type_detection() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":2}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3,
               "annotations":{{"containerd.io/snapshot/stargz/toc.digest":"x"}}}}]}}"#,
            d(1),
            d(2)
        );
        // No mediaType field: the Content-Type header decides, then the shape.
        match ManifestDocument::parse(manifest.as_bytes(), Some(DOCKER_MANIFEST)).unwrap() {
            ManifestDocument::Image {
                media_type,
                manifest,
            } => {
                assert_eq!(media_type, DOCKER_MANIFEST);
                assert_eq!(manifest.layers[0].size, 3);
                assert_eq!(manifest.layers[0].annotations.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        match ManifestDocument::parse(manifest.as_bytes(), Some("application/json")).unwrap() {
            ManifestDocument::Image { media_type, .. } => assert_eq!(media_type, OCI_MANIFEST),
            other => panic!("{other:?}"),
        }
        let schema1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(ManifestDocument::parse(schema1, None).is_err());
        assert!(ManifestDocument::parse(b"not json", None).is_err());
        let odd = br#"{"schemaVersion":2,"mediaType":"application/x-odd"}"#;
        assert!(ManifestDocument::parse(odd, None).is_err());
        let bad_digest =
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:zz","size":1}]}"#;
        assert!(ManifestDocument::parse(bad_digest, None).is_err());
    }
}

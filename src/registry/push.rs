//! Pushing blobs and manifests (distribution spec "push"): `HEAD` to skip blobs the
//! registry has, `POST` to open an upload, one `PUT` for small blobs or `PATCH`
//! pieces then a closing `PUT` for large ones, and a manifest `PUT` last, so a tag
//! never points at missing blobs.

use std::path::Path;

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{StatusCode, Url};
use tokio::io::AsyncReadExt;

use crate::digest::Digest;

use super::client::RegistryClient;
use super::error::RegistryError;
use super::reference::Repository;

/// Blobs up to this size go in one `PUT`; larger ones in `PATCH` pieces of this size,
/// so memory use does not grow with the blob.
pub const UPLOAD_PIECE_BYTES: u64 = 16 << 20;

/// Whether the registry already has `digest` in `repo`.
pub async fn blob_exists(
    client: &RegistryClient,
    repo: &Repository,
    digest: &Digest,
) -> Result<bool, RegistryError> {
    let object = format!("blob {digest}");
    let path = format!("{}/blobs/{digest}", repo.name());
    let resp = client
        .send_push(repo, &object, |http, base| http.head(join(base, &path)))
        .await?;
    match resp.status() {
        StatusCode::OK => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(client.push_status_error(repo, &object, &resp)),
    }
}

/// Uploads the blob in file `path` (of `size` bytes, hashing to `digest`) unless the
/// registry has it. Returns whether bytes were sent.
pub async fn push_blob_file(
    client: &RegistryClient,
    repo: &Repository,
    digest: &Digest,
    size: u64,
    path: &Path,
) -> Result<bool, RegistryError> {
    if blob_exists(client, repo, digest).await? {
        return Ok(false);
    }
    let object = format!("blob {digest}");
    let local = |e: std::io::Error| RegistryError::Config {
        path: path.to_owned(),
        reason: format!("reading the blob {digest} to upload: {e}"),
    };
    let mut file = tokio::fs::File::open(path).await.map_err(local)?;
    let mut location = start_upload(client, repo, &object).await?;
    if size <= UPLOAD_PIECE_BYTES {
        let mut body = Vec::with_capacity(size as usize);
        file.read_to_end(&mut body).await.map_err(local)?;
        finish_upload(client, repo, &object, &location, digest, Bytes::from(body)).await?;
        return Ok(true);
    }
    let mut sent = 0u64;
    while sent < size {
        let len = UPLOAD_PIECE_BYTES.min(size - sent);
        let mut piece = vec![0u8; len as usize];
        file.read_exact(&mut piece).await.map_err(local)?;
        let piece = Bytes::from(piece);
        let range = format!("{sent}-{}", sent + len - 1);
        let resp = client
            .send_push(repo, &object, |http, _| {
                http.patch(location.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_RANGE, range.as_str())
                    .header(CONTENT_LENGTH, len)
                    .body(piece.clone())
            })
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(client.push_status_error(repo, &object, &resp));
        }
        location = next_location(client, repo, &object, &resp, &location)?;
        sent += len;
    }
    finish_upload(client, repo, &object, &location, digest, Bytes::new()).await?;
    Ok(true)
}

/// Uploads a small blob held in memory (configs) unless the registry has it.
pub async fn push_blob_bytes(
    client: &RegistryClient,
    repo: &Repository,
    digest: &Digest,
    bytes: Bytes,
) -> Result<bool, RegistryError> {
    if blob_exists(client, repo, digest).await? {
        return Ok(false);
    }
    let object = format!("blob {digest}");
    let location = start_upload(client, repo, &object).await?;
    finish_upload(client, repo, &object, &location, digest, bytes).await?;
    Ok(true)
}

/// Puts a manifest or index under `reference` (a tag, or its digest).
pub async fn push_manifest(
    client: &RegistryClient,
    repo: &Repository,
    reference: &str,
    media_type: &str,
    bytes: Bytes,
) -> Result<(), RegistryError> {
    let object = format!("manifest {reference}");
    let path = format!("{}/manifests/{reference}", repo.name());
    let resp = client
        .send_push(repo, &object, |http, base| {
            http.put(join(base, &path))
                .header(CONTENT_TYPE, media_type)
                .body(bytes.clone())
        })
        .await?;
    if !resp.status().is_success() {
        return Err(client.push_status_error(repo, &object, &resp));
    }
    Ok(())
}

fn join(base: &Url, path: &str) -> Url {
    // `base` ends in `/v2/` and `path` is relative: joining cannot fail.
    base.join(path).unwrap_or_else(|_| base.clone())
}

async fn start_upload(
    client: &RegistryClient,
    repo: &Repository,
    object: &str,
) -> Result<Url, RegistryError> {
    let path = format!("{}/blobs/uploads/", repo.name());
    let resp = client
        .send_push(repo, object, |http, base| {
            http.post(join(base, &path)).header(CONTENT_LENGTH, 0)
        })
        .await?;
    if resp.status() != StatusCode::ACCEPTED {
        return Err(client.push_status_error(repo, object, &resp));
    }
    let base = resp.url().clone();
    next_location(client, repo, object, &resp, &base)
}

fn next_location(
    client: &RegistryClient,
    repo: &Repository,
    object: &str,
    resp: &reqwest::Response,
    previous: &Url,
) -> Result<Url, RegistryError> {
    resp.headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| previous.join(v).ok())
        .ok_or_else(|| RegistryError::HttpClient {
            host: repo.registry().to_owned(),
            reason: format!(
                "uploading {object} to {}: the registry gave no usable upload Location ({})",
                repo.name(),
                client.push_status_error(repo, object, resp)
            ),
        })
}

async fn finish_upload(
    client: &RegistryClient,
    repo: &Repository,
    object: &str,
    location: &Url,
    digest: &Digest,
    body: Bytes,
) -> Result<(), RegistryError> {
    let mut url = location.clone();
    url.query_pairs_mut().append_pair("digest", digest.as_str());
    let len = body.len();
    let resp = client
        .send_push(repo, object, |http, _| {
            http.put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, len)
                .body(body.clone())
        })
        .await?;
    if resp.status() != StatusCode::CREATED {
        return Err(client.push_status_error(repo, object, &resp));
    }
    Ok(())
}

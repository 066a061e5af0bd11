//! The gRPC adapter: containerd's `Snapshots` service over any [`Snapshotter`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tonic::{Request, Response, Status};

use super::{Info, Kind, Labels, Snapshotter};
use crate::api::containerd::services::snapshots::v1 as api;
use crate::api::containerd::services::snapshots::v1::snapshots_server::{
    Snapshots, SnapshotsServer,
};

/// containerd's own service sends listings in batches of this many.
const LIST_BATCH: usize = 100;

/// Serves a [`Snapshotter`] as `containerd.services.snapshots.v1.Snapshots`.
pub struct SnapshotService<S> {
    snapshotter: Arc<S>,
}

impl<S: Snapshotter> SnapshotService<S> {
    pub fn new(snapshotter: Arc<S>) -> Self {
        Self { snapshotter }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> SnapshotsServer<Self> {
        SnapshotsServer::new(self)
    }
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
    }
}

fn system_time(timestamp: Option<prost_types::Timestamp>) -> SystemTime {
    timestamp
        .and_then(|t| {
            let seconds = u64::try_from(t.seconds).ok()?;
            let nanos = u32::try_from(t.nanos).ok()?;
            SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
        })
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn to_api(info: Info) -> api::Info {
    let kind = match info.kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    };
    api::Info {
        name: info.name,
        parent: info.parent,
        kind: kind as i32,
        created_at: Some(timestamp(info.created_at)),
        updated_at: Some(timestamp(info.updated_at)),
        labels: info.labels.into_iter().collect(),
    }
}

/// Only name and labels of an update request matter; the rest is immutable.
fn from_api(info: api::Info) -> Info {
    let kind = match api::Kind::try_from(info.kind) {
        Ok(api::Kind::View) => Kind::View,
        Ok(api::Kind::Committed) => Kind::Committed,
        _ => Kind::Active,
    };
    Info {
        name: info.name,
        parent: info.parent,
        kind,
        labels: info.labels.into_iter().collect::<Labels>(),
        created_at: system_time(info.created_at),
        updated_at: system_time(info.updated_at),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Snapshotter> Snapshots for SnapshotService<S> {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let request = request.into_inner();
        tracing::debug!(key = %request.key, parent = %request.parent, "prepare");
        let mounts = self
            .snapshotter
            .prepare(
                request.key,
                request.parent,
                request.labels.into_iter().collect(),
            )
            .await
            .map_err(Into::into)?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let request = request.into_inner();
        tracing::debug!(key = %request.key, parent = %request.parent, "view");
        let mounts = self
            .snapshotter
            .view(
                request.key,
                request.parent,
                request.labels.into_iter().collect(),
            )
            .await
            .map_err(Into::into)?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let mounts = self
            .snapshotter
            .mounts(request.into_inner().key)
            .await
            .map_err(Into::into)?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let request = request.into_inner();
        tracing::debug!(key = %request.key, name = %request.name, "commit");
        self.snapshotter
            .commit(
                request.name,
                request.key,
                request.labels.into_iter().collect(),
            )
            .await
            .map_err(Into::into)?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        tracing::debug!(%key, "remove");
        self.snapshotter.remove(key).await.map_err(Into::into)?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let info = self
            .snapshotter
            .stat(request.into_inner().key)
            .await
            .map_err(Into::into)?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let request = request.into_inner();
        let info = request
            .info
            .ok_or_else(|| Status::invalid_argument("update request carries no snapshot info"))?;
        let fieldpaths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        let info = self
            .snapshotter
            .update(from_api(info), fieldpaths)
            .await
            .map_err(Into::into)?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let infos = self
            .snapshotter
            .list(request.into_inner().filters)
            .await
            .map_err(Into::into)?;
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|batch| {
                Ok(api::ListSnapshotsResponse {
                    info: batch.iter().cloned().map(to_api).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let usage = self
            .snapshotter
            .usage(request.into_inner().key)
            .await
            .map_err(Into::into)?;
        Ok(Response::new(api::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<()>, Status> {
        self.snapshotter.cleanup().await.map_err(Into::into)?;
        Ok(Response::new(()))
    }
}

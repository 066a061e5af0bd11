//! `sluice.v1.Profiler` over a [`Recorder`], served by sluice-snapshotter next to
//! containerd's snapshots service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::recorder::{RecordError, Recorder, RecordingId};
use crate::api::sluice::v1 as api;
use crate::api::sluice::v1::profiler_server::{Profiler, ProfilerServer};
use crate::digest::Digest;

/// Serves recordings of the daemon's FUSE mounts.
pub struct ProfilerService {
    recorder: Arc<Recorder>,
}

impl ProfilerService {
    pub fn new(recorder: Arc<Recorder>) -> Self {
        Self { recorder }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> ProfilerServer<Self> {
        ProfilerServer::new(self)
    }
}

impl From<RecordError> for Status {
    fn from(error: RecordError) -> Self {
        let code = match error {
            RecordError::NoLayers => tonic::Code::InvalidArgument,
            RecordError::TooManyRecordings => tonic::Code::ResourceExhausted,
            RecordError::UnknownRecording { .. } => tonic::Code::NotFound,
        };
        Status::new(code, error.to_string())
    }
}

#[tonic::async_trait]
impl Profiler for ProfilerService {
    async fn start_recording(
        &self,
        request: Request<api::StartRecordingRequest>,
    ) -> Result<Response<api::StartRecordingResponse>, Status> {
        let layers = request
            .into_inner()
            .layer_digests
            .iter()
            .map(|digest| {
                digest.parse::<Digest>().map_err(|error| {
                    Status::invalid_argument(format!("layer digest {digest:?}: {error}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let id = self.recorder.start(layers)?;
        tracing::info!(recording = %id, "recording started");
        Ok(Response::new(api::StartRecordingResponse {
            recording_id: id.to_string(),
        }))
    }

    async fn stop_recording(
        &self,
        request: Request<api::StopRecordingRequest>,
    ) -> Result<Response<api::StopRecordingResponse>, Status> {
        let text = request.into_inner().recording_id;
        let id = text
            .parse::<u64>()
            .map(RecordingId)
            .map_err(|_| RecordError::UnknownRecording { id: text.clone() })?;
        let recording = self.recorder.stop(id)?;
        tracing::info!(recording = %id, files = recording.files.len(), truncated = recording.truncated, "recording stopped");
        Ok(Response::new(api::StopRecordingResponse {
            files: recording
                .files
                .into_iter()
                .map(|file| api::RecordedFile {
                    layer_digest: file.layer.to_string(),
                    path: file.path,
                })
                .collect(),
            truncated: recording.truncated,
        }))
    }
}

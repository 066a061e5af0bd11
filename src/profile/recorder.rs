//! The daemon side of recording: which files of which layers a run touches, in order.
//!
//! The FUSE read path asks [`Recorder::is_recording`] on every open and read: one
//! relaxed atomic load, no lock and no allocation while nothing is recorded. Only
//! while a recording is active does an access take the recorder's lock, and only the
//! first access to a file allocates (its path).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::digest::Digest;
use crate::format::EntryId;

/// Recordings one daemon keeps at once; a client that never stops its recording
/// cannot make the daemon hold more.
pub const MAX_RECORDINGS: usize = 16;
/// Files one recording keeps; later first accesses are dropped and the recording is
/// marked truncated.
pub const MAX_FILES_PER_RECORDING: usize = 1 << 20;

/// Names one recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordingId(pub u64);

impl std::fmt::Display for RecordingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One file a recording saw, in first-access order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedAccess {
    pub layer: Digest,
    /// Absolute path in the image (`/etc/passwd`).
    pub path: String,
}

/// What a stopped recording saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    pub files: Vec<RecordedAccess>,
    /// [`MAX_FILES_PER_RECORDING`] was reached; later files are missing.
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("a recording needs at least one layer digest")]
    NoLayers,
    #[error(
        "{MAX_RECORDINGS} recordings are already running; stop one (or restart sluice-snapshotter to drop abandoned ones)"
    )]
    TooManyRecordings,
    #[error("no recording {id} is running; it was stopped already or the daemon restarted")]
    UnknownRecording { id: String },
}

#[derive(Debug)]
struct Active {
    /// The layers recorded, few per image; an access's layer is looked up by scan.
    layers: Vec<Digest>,
    /// (position in `layers`, entry) of every file already recorded.
    seen: HashSet<(usize, EntryId)>,
    recording: Recording,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    active: HashMap<RecordingId, Active>,
}

/// Shared by the FUSE mounts (which report accesses) and the gRPC service (which
/// starts and stops recordings).
#[derive(Debug, Default)]
pub struct Recorder {
    /// Some recording is active. Checked before anything else on the read path.
    recording: AtomicBool,
    state: Mutex<State>,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any recording is active: the read path's only cost when none is.
    #[inline]
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Start recording accesses to `layers`.
    pub fn start(&self, layers: Vec<Digest>) -> Result<RecordingId, RecordError> {
        if layers.is_empty() {
            return Err(RecordError::NoLayers);
        }
        let mut state = self.state();
        if state.active.len() >= MAX_RECORDINGS {
            return Err(RecordError::TooManyRecordings);
        }
        state.next_id += 1;
        let id = RecordingId(state.next_id);
        state.active.insert(
            id,
            Active {
                layers,
                seen: HashSet::new(),
                recording: Recording::default(),
            },
        );
        self.recording.store(true, Ordering::Relaxed);
        Ok(id)
    }

    /// End recording `id` and return what it saw.
    pub fn stop(&self, id: RecordingId) -> Result<Recording, RecordError> {
        let mut state = self.state();
        let active = state
            .active
            .remove(&id)
            .ok_or_else(|| RecordError::UnknownRecording { id: id.to_string() })?;
        if state.active.is_empty() {
            self.recording.store(false, Ordering::Relaxed);
        }
        Ok(active.recording)
    }

    /// Note that `entry` (named `name` in its layer's index) of `layer` was opened or
    /// read. Call only after [`Recorder::is_recording`] said yes.
    pub fn record(&self, layer: &Digest, entry: EntryId, name: &str) {
        let mut state = self.state();
        for active in state.active.values_mut() {
            let Some(position) = active.layers.iter().position(|l| l == layer) else {
                continue;
            };
            if active.recording.files.len() >= MAX_FILES_PER_RECORDING {
                active.recording.truncated = true;
                continue;
            }
            if active.seen.insert((position, entry)) {
                active.recording.files.push(RecordedAccess {
                    layer: layer.clone(),
                    path: absolute(name),
                });
            }
        }
    }
}

/// A TOC entry name (`usr/bin/x`, `./usr/bin/x`) as an absolute image path.
fn absolute(name: &str) -> String {
    crate::prefetch::ImagePath::new(name).as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: u8) -> Digest {
        Digest::sha256_of(&[byte])
    }

    #[test]
    fn records_first_accesses_in_order_once_and_only_for_its_layers() {
        let recorder = Recorder::new();
        assert!(!recorder.is_recording());
        let (a, b, other) = (digest(1), digest(2), digest(3));
        let id = recorder.start(vec![a.clone(), b.clone()]).unwrap();
        assert!(recorder.is_recording());
        recorder.record(&b, EntryId(7), "usr/bin/start");
        recorder.record(&a, EntryId(3), "./bin/busybox");
        recorder.record(&b, EntryId(7), "usr/bin/start");
        recorder.record(&other, EntryId(1), "etc/never");
        recorder.record(&a, EntryId(9), "data/ab.txt");
        let recording = recorder.stop(id).unwrap();
        assert!(!recorder.is_recording());
        let seen: Vec<(&Digest, &str)> = recording
            .files
            .iter()
            .map(|f| (&f.layer, f.path.as_str()))
            .collect();
        assert_eq!(
            seen,
            vec![
                (&b, "/usr/bin/start"),
                (&a, "/bin/busybox"),
                (&a, "/data/ab.txt")
            ]
        );
        assert!(!recording.truncated);
        assert!(matches!(
            recorder.stop(id),
            Err(RecordError::UnknownRecording { .. })
        ));
    }

    #[test]
    fn overlapping_recordings_each_see_their_own_accesses() {
        let recorder = Recorder::new();
        let layer = digest(1);
        let first = recorder.start(vec![layer.clone()]).unwrap();
        recorder.record(&layer, EntryId(1), "one");
        let second = recorder.start(vec![layer.clone()]).unwrap();
        recorder.record(&layer, EntryId(1), "one");
        recorder.record(&layer, EntryId(2), "two");
        assert_eq!(recorder.stop(first).unwrap().files.len(), 2);
        assert!(recorder.is_recording(), "the second recording still runs");
        let second = recorder.stop(second).unwrap();
        let paths: Vec<&str> = second.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["/one", "/two"]);
        assert!(!recorder.is_recording());
    }

    #[test]
    fn refuses_empty_and_too_many_recordings() {
        let recorder = Recorder::new();
        assert!(matches!(recorder.start(vec![]), Err(RecordError::NoLayers)));
        for _ in 0..MAX_RECORDINGS {
            recorder.start(vec![digest(1)]).unwrap();
        }
        assert!(matches!(
            recorder.start(vec![digest(1)]),
            Err(RecordError::TooManyRecordings)
        ));
    }
}

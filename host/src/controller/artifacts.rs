//! Artifacts on the controller. Chunks from the agent are appended in order under the
//! run's folder (`runs/<id>/incoming/<name>` while arriving); the last one carries the
//! size and SHA-256 the agent computed, which the stored bytes must match before the
//! file moves to `runs/<id>/artifacts/<name>` and is listed in the run's record.

use crate::ha::token::StateGate;
use crate::protocol::ArtifactEnd;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Its path relative to the step's workdir.
    pub name: String,
    /// The step that produced it (None: the run itself, e.g. the full log).
    pub step: Option<String>,
    pub size: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact name `{}` is refused: an artifact name is {}", crate::ids::Shown(.0), crate::ids::ARTIFACT_RULE)]
    BadName(String),
    #[error("artifact `{name}`: a chunk at offset {offset}, but {stored} bytes are stored")]
    OutOfOrder {
        name: String,
        offset: u64,
        stored: u64,
    },
    #[error(
        "artifact `{name}`: the agent sent {sent_size} bytes with SHA-256 {sent}, the controller stored {stored_size} bytes with SHA-256 {stored}; discarded"
    )]
    Mismatch {
        name: String,
        sent: String,
        sent_size: u64,
        stored: String,
        stored_size: u64,
    },
    #[error("artifact `{name}`: {source}")]
    Io { name: String, source: io::Error },
}

/// Where a finished artifact of the run in `run_dir` lives (None: not a valid name).
pub fn path(run_dir: &Path, name: &str) -> Option<PathBuf> {
    crate::ids::is_artifact_name(name).then(|| run_dir.join("artifacts").join(name))
}

/// Take one chunk. Returns the artifact's record when this was its last chunk and the
/// stored file matched the agent's size and checksum. With a fencing-token `gate` (HA),
/// the artifact is made visible (renamed into `artifacts/`) only through it: a replaced
/// controller cannot publish one.
pub fn receive(
    gate: Option<&StateGate>,
    run_dir: &Path,
    step: Option<&str>,
    name: &str,
    offset: u64,
    data: &[u8],
    end: Option<&ArtifactEnd>,
) -> Result<Option<ArtifactRecord>, ArtifactError> {
    if !crate::ids::is_artifact_name(name) {
        return Err(ArtifactError::BadName(name.into()));
    }
    let rel = Path::new(name);
    let io_err = |source| ArtifactError::Io {
        name: name.into(),
        source,
    };
    let incoming = run_dir.join("incoming").join(rel);
    if offset == 0 {
        // A first chunk starts the file afresh (also when a restarted agent sends again).
        std::fs::create_dir_all(incoming.parent().expect("has a parent")).map_err(io_err)?;
        std::fs::File::create(&incoming).map_err(io_err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&incoming)
        .map_err(io_err)?;
    let stored = f.metadata().map_err(io_err)?.len();
    if stored != offset {
        return Err(ArtifactError::OutOfOrder {
            name: name.into(),
            offset,
            stored,
        });
    }
    f.write_all(data).map_err(io_err)?;
    let Some(end) = end else {
        return Ok(None);
    };
    f.sync_all().map_err(io_err)?;
    drop(f);
    // Hash what is on disk, not what passed through memory: the check covers the store.
    let (size, sha256) = hash_file(&incoming).map_err(io_err)?;
    if size != end.size || sha256 != end.sha256 {
        let _ = std::fs::remove_file(&incoming);
        return Err(ArtifactError::Mismatch {
            name: name.into(),
            sent: end.sha256.clone(),
            sent_size: end.size,
            stored: sha256,
            stored_size: size,
        });
    }
    let done = run_dir.join("artifacts").join(rel);
    let parent = done.parent().expect("has a parent");
    let publish = || {
        std::fs::create_dir_all(parent)?;
        std::fs::rename(&incoming, &done)?;
        std::fs::File::open(parent).and_then(|d| d.sync_all())
    };
    match gate {
        Some(g) => g.write(publish),
        None => publish(),
    }
    .map_err(io_err)?;
    Ok(Some(ArtifactRecord {
        name: name.into(),
        step: step.map(str::to_string),
        size,
        sha256,
    }))
}

pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hash.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(data: &[u8]) -> ArtifactEnd {
        ArtifactEnd {
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
        }
    }

    #[test]
    fn chunks_assemble_and_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        assert!(
            receive(
                None,
                d.path(),
                Some("b"),
                "out/x.bin",
                0,
                &data[..600],
                None
            )
            .unwrap()
            .is_none()
        );
        let r = receive(
            None,
            d.path(),
            Some("b"),
            "out/x.bin",
            600,
            &data[600..],
            Some(&end(&data)),
        )
        .unwrap()
        .expect("finished");
        assert_eq!((r.size, r.step.as_deref()), (1000, Some("b")));
        assert_eq!(
            std::fs::read(path(d.path(), "out/x.bin").unwrap()).unwrap(),
            data
        );
    }

    #[test]
    fn a_wrong_checksum_a_gap_or_a_bad_name_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = receive(None, d.path(), None, "a", 0, b"hello", Some(&end(b"hellO"))).unwrap_err();
        assert!(e.to_string().contains("discarded"), "{e}");
        assert!(path(d.path(), "a").is_some_and(|p| !p.exists()));
        receive(None, d.path(), None, "b", 0, b"12", None).unwrap();
        let e = receive(None, d.path(), None, "b", 5, b"34", None).unwrap_err();
        assert!(
            matches!(e, ArtifactError::OutOfOrder { stored: 2, .. }),
            "{e}"
        );
        for bad in ["../x", "/etc/passwd", "", "out/../../x", "a\nb"] {
            assert!(matches!(
                receive(None, d.path(), None, bad, 0, b"x", None),
                Err(ArtifactError::BadName(_))
            ));
        }
    }

    #[test]
    fn a_replaced_controller_cannot_publish_an_artifact() {
        let d = tempfile::tempdir().unwrap();
        let newer = StateGate::open(d.path(), 7).unwrap();
        newer.write(|| Ok(())).unwrap();
        let older = StateGate::open(d.path(), 5).unwrap();
        let e = receive(Some(&older), d.path(), None, "a", 0, b"x", Some(&end(b"x"))).unwrap_err();
        assert!(e.to_string().contains("older than 7"), "{e}");
        assert!(path(d.path(), "a").is_some_and(|p| !p.exists()));
        assert_eq!(older.refused(), 1);
        // The current active publishes as before.
        let r = receive(Some(&newer), d.path(), None, "a", 0, b"x", Some(&end(b"x"))).unwrap();
        assert!(r.is_some() && path(d.path(), "a").unwrap().exists());
    }
}

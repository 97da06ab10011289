//! Artifacts on the agent: the files a step leaves that its job asked to keep, found by
//! glob under the step's workdir and streamed to the controller in checksummed chunks
//! on the bulk lane (so they never hold up a cancel).

use crate::protocol::{self, ArtifactEnd, ToController};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Bytes per chunk: well under the session's bulk budget per round, so a large file
/// interleaves with other traffic instead of hogging the link.
pub const CHUNK: usize = 256 << 10;

/// A file to send: its name (path relative to the step's workdir) and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub name: String,
    pub path: PathBuf,
}

/// Files under `dir` matching `patterns` (in pattern order, each file once), and a
/// readable problem for each pattern that matched nothing or matched something it may
/// not send (a directory, or a symlink resolving outside `root`, the run's workspace).
pub fn find(root: &Path, dir: &Path, patterns: &[String]) -> (Vec<Found>, Vec<String>) {
    let (mut found, mut problems) = (Vec::<Found>::new(), Vec::new());
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    for pattern in patterns {
        let full = format!(
            "{}/{}",
            glob::Pattern::escape(&dir.to_string_lossy()),
            pattern
        );
        let paths = match glob::glob(&full) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("artifact pattern `{pattern}` is not a glob: {e}"));
                continue;
            }
        };
        let mut matched = false;
        for path in paths.flatten() {
            if !path.is_file() {
                continue; // directories match `*` too; only files are artifacts
            }
            let inside = path
                .canonicalize()
                .is_ok_and(|real| real.starts_with(&root));
            if !inside {
                problems.push(format!(
                    "`{}` resolves outside the run's workspace; not sent",
                    path.display()
                ));
                continue;
            }
            let name = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            matched = true;
            if !crate::ids::is_artifact_name(&name) {
                problems.push(format!(
                    "`{}` is not sent: an artifact name is {}",
                    crate::ids::Shown(&name),
                    crate::ids::ARTIFACT_RULE
                ));
                continue;
            }
            if !found.iter().any(|f| f.name == name) {
                found.push(Found { name, path });
            }
        }
        if !matched {
            problems.push(format!("no file matches artifact pattern `{pattern}`"));
        }
    }
    (found, problems)
}

/// Stream one file as `ArtifactChunk` messages (already encoded, for the bulk lane).
/// The checksum covers exactly the bytes sent. Awaiting `out` back-pressures the read
/// when the link is slower than the disk.
pub async fn send(
    run: &str,
    step: Option<&str>,
    f: &Found,
    out: &mpsc::Sender<Vec<u8>>,
) -> std::io::Result<ArtifactEnd> {
    let mut file = tokio::fs::File::open(&f.path).await?;
    let mut hash = Sha256::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Fill the chunk (a short read is not the end of the file).
        let mut n = 0;
        while n < CHUNK {
            let got = file.read(&mut buf[n..]).await?;
            if got == 0 {
                break;
            }
            n += got;
        }
        hash.update(&buf[..n]);
        let last = n < CHUNK;
        let end = last.then(|| ArtifactEnd {
            size: offset + n as u64,
            sha256: hex::encode(hash.clone().finalize()),
        });
        let msg = ToController::ArtifactChunk {
            run: run.to_string(),
            step: step.map(str::to_string),
            name: f.name.clone(),
            offset,
            end: end.clone(),
        };
        if out.send(protocol::encode(&msg, &buf[..n])).await.is_err() {
            return Err(std::io::Error::other("the agent is stopping"));
        }
        offset += n as u64;
        if let Some(end) = end {
            return Ok(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_find_files_once_and_refuse_what_leaves_the_workspace() {
        let ws = tempfile::tempdir().unwrap();
        let dir = ws.path().join("src");
        std::fs::create_dir_all(dir.join("out/deep")).unwrap();
        std::fs::write(dir.join("out/a.tar.gz"), b"a").unwrap();
        std::fs::write(dir.join("out/deep/b.tar.gz"), b"b").unwrap();
        std::fs::write(dir.join("report.xml"), b"r").unwrap();
        std::fs::write(dir.join("odd\tname.xml"), b"o").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.key"), b"k").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.key"), dir.join("link.xml"))
            .unwrap();
        let patterns = ["out/**/*.tar.gz", "*.xml", "out/a.tar.gz", "missing/*"]
            .map(String::from)
            .to_vec();
        let (found, problems) = find(ws.path(), &dir, &patterns);
        let names: Vec<_> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["out/a.tar.gz", "out/deep/b.tar.gz", "report.xml"]);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("link.xml") && p.contains("outside"))
        );
        assert!(problems.iter().any(|p| p.contains("`missing/*`")));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("odd\\tname.xml") && p.contains("not sent"))
        );
    }
}

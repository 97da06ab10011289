//! `quota` on a read-write directory grant (`dirs = [{ host, guest, mode = "read-write",
//! quota = "100MiB" }]`): writes that would take the directory past it fail inside the
//! plugin as they would on a full disk, and are counted
//! (`trellis_plugin_quota_refusals_total`). `write` and `set-size` on a descriptor fail
//! with `insufficient-space` (ENOSPC); a stream write fails with `last-operation-failed`
//! carrying ENOSPC, which wasi-libc (Rust's `std::fs::File::write`) reports as `EIO`,
//! exactly as it reports a really full disk (`tests/disk_full.rs` compares the two).
//!
//! How: wasmtime-wasi's `wasi:filesystem/types` is linked as usual, then shadowed (only
//! for a plugin with a quota) by [`QuotaFs`], which hands every call to wasmtime-wasi's
//! own implementation and checks the few that add bytes: `write` and `set-size` on a
//! descriptor, and the output streams of `write-via-stream`/`append-via-stream` (each
//! wrapped in a [`QuotaStream`]). A descriptor belongs to a grant when it is that
//! grant's preopen or was opened from one of its descriptors. A rename or hard link
//! into a grant with a quota from another grant is refused (`cross-device`, as between
//! filesystems): the file would arrive without being written under the quota.
//!
//! Accounting ([`DirQuota`]): a write is charged the bytes it adds past the file's end
//! (a stream at the end, or past it, counts all its bytes). While the charges stay under
//! the quota nothing is measured; at the quota the directory is measured (the sum of
//! its files' sizes, symlinks not followed, at most every [`REMEASURE_EVERY`]) so that
//! deleted or overwritten files count as they are. Bytes are file sizes as `stat`
//! reports them, not disk blocks; directories and metadata are not counted. The quota
//! is the plugin's, shared by all its instances, and bounds what *this plugin* writes:
//! files others put in the directory count toward it, but are not refused.

use crate::runtime::metrics::PluginMetrics;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, FsError, FsResult, OutputStream, Pollable, StreamError,
    StreamResult,
};

/// The directory is measured again at most this often (when the charges reach the quota).
pub const REMEASURE_EVERY: Duration = Duration::from_millis(200);

/// One granted directory's quota, shared by the plugin's instances.
#[derive(Debug)]
pub struct DirQuota {
    pub host: PathBuf,
    pub guest: String,
    pub limit: u64,
    usage: Mutex<Usage>,
}

#[derive(Debug, Default)]
struct Usage {
    /// The directory's size when last measured.
    measured: u64,
    /// Bytes charged since.
    charged: u64,
    measured_at: Option<Instant>,
}

impl DirQuota {
    pub fn new(host: PathBuf, guest: String, limit: u64) -> DirQuota {
        DirQuota {
            host,
            guest,
            limit,
            usage: Mutex::default(),
        }
    }

    /// Charge `grow` more bytes; false (nothing charged) if that passes the quota.
    pub fn charge(&self, grow: u64) -> bool {
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if u.measured_at.is_none() {
            u.measured = dir_size(&self.host);
            u.measured_at = Some(Instant::now());
        }
        if u.measured.saturating_add(u.charged).saturating_add(grow) <= self.limit {
            u.charged += grow;
            return true;
        }
        // Over by the estimate: the estimate only grows, so measure before refusing.
        if u.measured_at
            .is_some_and(|t| t.elapsed() >= REMEASURE_EVERY)
        {
            u.measured = dir_size(&self.host);
            u.charged = 0;
            u.measured_at = Some(Instant::now());
            if u.measured.saturating_add(grow) <= self.limit {
                u.charged = grow;
                return true;
            }
        }
        false
    }
}

/// The sum of the sizes of the files under `dir` (symlinks not followed).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// The error a refused write gets: what the OS says when a disk is full.
fn no_space() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENOSPC)
}

/// An instance's side: its grants' quotas, and which of its descriptors belong to them.
#[derive(Default)]
pub struct QuotaState {
    /// By guest path.
    grants: Vec<Arc<DirQuota>>,
    /// Descriptor (table index) → the quota of the grant it lies in.
    owners: HashMap<u32, Arc<DirQuota>>,
    metrics: Arc<PluginMetrics>,
}

impl QuotaState {
    pub fn new(grants: Vec<Arc<DirQuota>>, metrics: Arc<PluginMetrics>) -> QuotaState {
        QuotaState {
            grants,
            owners: HashMap::new(),
            metrics,
        }
    }

    fn refused(&self, q: &DirQuota) -> FsError {
        self.metrics.quota_refusals.fetch_add(1, Relaxed);
        tracing::debug!(dir = %q.host.display(), quota = q.limit, "a write past the directory's quota refused");
        ErrorCode::InsufficientSpace.into()
    }
}

impl QuotaState {
    fn refused_move(&self) -> FsError {
        self.metrics.quota_refusals.fetch_add(1, Relaxed);
        ErrorCode::CrossDevice.into()
    }
}

/// `wasi:filesystem` for a plugin with a quota: wasmtime-wasi's, with writes checked.
pub struct QuotaFs<'a> {
    pub fs: WasiFilesystemCtxView<'a>,
    pub quota: &'a mut QuotaState,
}

/// The linker's marker for [`QuotaFs`].
pub struct QuotaFsData;

impl HasData for QuotaFsData {
    type Data<'a> = QuotaFs<'a>;
}

impl QuotaFs<'_> {
    fn quota_of(&self, fd: &Resource<types::Descriptor>) -> Option<Arc<DirQuota>> {
        self.quota.owners.get(&fd.rep()).cloned()
    }

    /// Whether a rename or link from `from`'s grant to `to`'s would bring a file into a
    /// grant with a quota that it was not written under (refused: as across devices).
    fn crosses_into_quota(
        &self,
        from: &Resource<types::Descriptor>,
        to: &Resource<types::Descriptor>,
    ) -> bool {
        match (self.quota_of(from), self.quota_of(to)) {
            (_, None) => false,
            (Some(a), Some(b)) => !Arc::ptr_eq(&a, &b),
            (None, Some(_)) => true,
        }
    }

    /// The open file behind `fd` (None: a directory, or not a descriptor).
    fn file_of(&self, fd: &Resource<types::Descriptor>) -> Option<Arc<std::fs::File>> {
        match self.fs.table.get(fd).ok()? {
            Descriptor::File(f) => Some(f.file.clone()),
            Descriptor::Dir(_) => None,
        }
    }
}

/// The bytes a write of `len` at `offset` adds to a file of size `size`.
fn growth(size: u64, offset: u64, len: u64) -> u64 {
    offset.saturating_add(len).saturating_sub(size)
}

fn file_size(f: &std::fs::File) -> u64 {
    f.metadata().map_or(0, |m| m.len())
}

impl preopens::Host for QuotaFs<'_> {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        let dirs = preopens::Host::get_directories(&mut self.fs)?;
        for (fd, guest) in &dirs {
            if let Some(q) = self.quota.grants.iter().find(|q| q.guest == *guest) {
                self.quota.owners.insert(fd.rep(), q.clone());
            }
        }
        Ok(dirs)
    }
}

impl types::Host for QuotaFs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        types::Host::convert_error_code(&mut self.fs, err)
    }

    fn filesystem_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        types::Host::filesystem_error_code(&mut self.fs, err)
    }
}

impl HostDescriptor for QuotaFs<'_> {
    async fn write(
        &mut self,
        fd: Resource<types::Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        if let (Some(q), Some(f)) = (self.quota_of(&fd), self.file_of(&fd))
            && !q.charge(growth(file_size(&f), offset, buf.len() as u64))
        {
            return Err(self.quota.refused(&q));
        }
        HostDescriptor::write(&mut self.fs, fd, buf, offset).await
    }

    async fn set_size(
        &mut self,
        fd: Resource<types::Descriptor>,
        size: types::Filesize,
    ) -> FsResult<()> {
        if let (Some(q), Some(f)) = (self.quota_of(&fd), self.file_of(&fd))
            && !q.charge(size.saturating_sub(file_size(&f)))
        {
            return Err(self.quota.refused(&q));
        }
        HostDescriptor::set_size(&mut self.fs, fd, size).await
    }

    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        let q = self.quota_of(&fd);
        let opened =
            HostDescriptor::open_at(&mut self.fs, fd, path_flags, path, oflags, flags).await?;
        if let Some(q) = q {
            self.quota.owners.insert(opened.rep(), q);
        }
        Ok(opened)
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        // Table indexes are reused: a later descriptor must not inherit this one's grant.
        self.quota.owners.remove(&fd.rep());
        HostDescriptor::drop(&mut self.fs, fd)
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        let quota = self.quota_of(&fd).zip(self.file_of(&fd));
        let stream = HostDescriptor::write_via_stream(&mut self.fs, fd, offset)?;
        self.wrap(stream, quota, Some(offset))
    }

    fn append_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let quota = self.quota_of(&fd).zip(self.file_of(&fd));
        let stream = HostDescriptor::append_via_stream(&mut self.fs, fd)?;
        self.wrap(stream, quota, None)
    }

    async fn advise(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        HostDescriptor::advise(&mut self.fs, fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        HostDescriptor::sync_data(&mut self.fs, fd).await
    }

    async fn get_flags(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorFlags> {
        HostDescriptor::get_flags(&mut self.fs, fd).await
    }

    async fn get_type(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorType> {
        HostDescriptor::get_type(&mut self.fs, fd).await
    }

    async fn set_times(
        &mut self,
        fd: Resource<types::Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times(&mut self.fs, fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<types::Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        HostDescriptor::read(&mut self.fs, fd, len, offset).await
    }

    async fn read_directory(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        HostDescriptor::read_directory(&mut self.fs, fd).await
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        HostDescriptor::sync(&mut self.fs, fd).await
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        HostDescriptor::create_directory_at(&mut self.fs, fd, path).await
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat(&mut self.fs, fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat_at(&mut self.fs, fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times_at(&mut self.fs, fd, path_flags, path, atim, mtim).await
    }

    async fn link_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        if self.crosses_into_quota(&fd, &new_descriptor) {
            return Err(self.quota.refused_move());
        }
        HostDescriptor::link_at(
            &mut self.fs,
            fd,
            old_path_flags,
            old_path,
            new_descriptor,
            new_path,
        )
        .await
    }

    async fn readlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<String> {
        HostDescriptor::readlink_at(&mut self.fs, fd, path).await
    }

    async fn remove_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        HostDescriptor::remove_directory_at(&mut self.fs, fd, path).await
    }

    async fn rename_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path: String,
        new_fd: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        if self.crosses_into_quota(&fd, &new_fd) {
            return Err(self.quota.refused_move());
        }
        HostDescriptor::rename_at(&mut self.fs, fd, old_path, new_fd, new_path).await
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        HostDescriptor::symlink_at(&mut self.fs, fd, src_path, dest_path).await
    }

    async fn unlink_file_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        HostDescriptor::unlink_file_at(&mut self.fs, fd, path).await
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        HostDescriptor::read_via_stream(&mut self.fs, fd, offset)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<types::Descriptor>,
        b: Resource<types::Descriptor>,
    ) -> wasmtime::Result<bool> {
        HostDescriptor::is_same_object(&mut self.fs, a, b).await
    }

    async fn metadata_hash(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash(&mut self.fs, fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash_at(&mut self.fs, fd, path_flags, path).await
    }
}

impl QuotaFs<'_> {
    /// Put a [`QuotaStream`] around a file's output stream in a grant with a quota.
    fn wrap(
        &mut self,
        stream: Resource<DynOutputStream>,
        quota: Option<(Arc<DirQuota>, Arc<std::fs::File>)>,
        at: Option<u64>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let Some((quota, file)) = quota else {
            return Ok(stream);
        };
        let inner = self.fs.table.delete(stream)?;
        let wrapped: DynOutputStream = Box::new(QuotaStream {
            inner,
            quota,
            file,
            at,
            metrics: self.quota.metrics.clone(),
        });
        Ok(self.fs.table.push(wrapped)?)
    }
}

impl HostDirectoryEntryStream for QuotaFs<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        HostDirectoryEntryStream::read_directory_entry(&mut self.fs, stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        HostDirectoryEntryStream::drop(&mut self.fs, stream)
    }
}

/// A file's output stream in a grant with a quota: each write is charged first.
pub struct QuotaStream {
    inner: DynOutputStream,
    quota: Arc<DirQuota>,
    file: Arc<std::fs::File>,
    /// Where the next write lands (None: appending, at the end).
    at: Option<u64>,
    metrics: Arc<PluginMetrics>,
}

#[wasmtime_wasi::async_trait]
impl Pollable for QuotaStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for QuotaStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        let len = bytes.len() as u64;
        let grow = match self.at {
            Some(at) => growth(file_size(&self.file), at, len),
            None => len,
        };
        if !self.quota.charge(grow) {
            self.metrics.quota_refusals.fetch_add(1, Relaxed);
            return Err(StreamError::LastOperationFailed(no_space().into()));
        }
        self.inner.write(bytes)?;
        if let Some(at) = &mut self.at {
            *at += len;
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_pass_the_quota_only_after_measuring() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("old"), vec![0u8; 600]).unwrap();
        let q = DirQuota::new(d.path().to_path_buf(), "/q".into(), 1000);
        assert!(q.charge(300), "600 + 300 fits");
        assert!(!q.charge(200), "600 + 300 + 200 does not");
        // Space returns (a file deleted): seen once measured again.
        std::fs::remove_file(d.path().join("old")).unwrap();
        std::thread::sleep(REMEASURE_EVERY);
        assert!(q.charge(900), "measured again: the directory is empty now");
        assert!(!q.charge(200));
    }

    #[test]
    fn only_bytes_past_the_end_grow_a_file() {
        assert_eq!(growth(100, 0, 50), 0);
        assert_eq!(growth(100, 80, 50), 30);
        assert_eq!(growth(100, 200, 50), 150);
    }
}

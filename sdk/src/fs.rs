//! File helpers that behave the same natively and inside the sandbox.

use std::fs::File;
use std::io;

/// Write all of `buf` at `offset` (a positioned write, like `pwrite`), without moving
/// the file's cursor.
///
/// Prefer this to `std::io::Write` for appending logs from a plugin: in the sandbox it
/// is one `wasi:filesystem` `descriptor.write`, which the host performs inline, whereas
/// `Write` on a `File` goes through a WASI output stream whose writes wasmtime hands to
/// a blocking thread pool (a thread round trip per write). Keep the offset yourself
/// (e.g. the file's length when you opened it).
pub fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match write_at(file, buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write the whole buffer",
                ));
            }
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::write_at(file, buf, offset)
}

#[cfg(target_os = "wasi")]
fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let offset = i64::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: `buf` is valid for `buf.len()` bytes and the descriptor is owned by `file`,
    // which outlives the call. (std's `FileExt::write_at` is still unstable on WASI.)
    let n = unsafe { libc::pwrite(file.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_at_offsets() {
        let d = std::env::temp_dir().join(format!("trellis-sdk-fs-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&d)
            .unwrap();
        super::write_all_at(&f, b"hello", 0).unwrap();
        super::write_all_at(&f, b" world", 5).unwrap();
        super::write_all_at(&f, b"W", 6).unwrap();
        assert_eq!(std::fs::read_to_string(&d).unwrap(), "hello World");
        std::fs::remove_file(&d).unwrap();
    }
}

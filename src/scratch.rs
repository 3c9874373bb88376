//! Test support, hidden from the docs: scratch directories that remove
//! themselves, so test runs leave nothing behind in the temp dir.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static N: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty directory under the system temp dir, removed with
/// everything in it when dropped (also when a test panics);
/// `TOOLGATE_KEEP_TEST_DIRS=1` keeps it for a look. Derefs to its path.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Makes `toolgate-test-PID-N-TAG`.
    pub fn new(tag: &str) -> std::io::Result<Scratch> {
        let d = std::env::temp_dir().join(format!(
            "toolgate-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Scratch(d))
    }
}

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("TOOLGATE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_dir_is_gone_once_dropped() {
        let s = Scratch::new("self").unwrap();
        std::fs::create_dir_all(s.join("a/b")).unwrap();
        std::fs::write(s.join("a/b/f"), "x").unwrap();
        let path = s.to_path_buf();
        assert!(path.join("a/b/f").exists());
        drop(s);
        assert!(!path.exists());
    }
}

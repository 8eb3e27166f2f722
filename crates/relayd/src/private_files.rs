//! Files that only the relay's operator may read: the users file (digest hashes, as good as
//! passwords for the realm) and the billing store (who used what, when, and what they owe).
//! Issue 14, finding 11: both used to be created readable by every local user.
//!
//! * A file created here gets mode `0600` from the start (`OpenOptionsExt::mode`), so it is
//!   never readable by others, not even for an instant; a data directory created here gets
//!   `0700`.
//! * A file that is replaced keeps the group and the group's permissions an operator gave
//!   the old one (`chgrp relayd users.toml; chmod 640 users.toml` lets the service read a
//!   file that root rewrites), but never the others' permissions.
//! * A file found already there (a billing store an older relayd created `0644`) loses its
//!   others' permissions; its group's are kept.
//! * [`write_atomic`] writes beside the file, flushes it to disk (`fsync`), renames it over
//!   the old one and flushes the directory, so a crash or a power cut leaves the old file
//!   or the new one, never a half-written or vanished one.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{fchown, PermissionsExt as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The mode of a private file: read and write for its owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// The mode of a private directory created here.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// The permission bits of others (neither owner nor group).
const OTHERS: u32 = 0o007;

/// The temporary file [`write_atomic`] writes before renaming it to `path`.
fn temporary(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries to disk (after a rename or a creation in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `contents`, atomically and durably (see the [module
/// documentation](self)): a new file gets mode 0600; a replaced one keeps its group and its
/// group's permissions, never the others'.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temporary(path);
    let old = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE_MODE)
        .open(&tmp)?;
    // A temporary file left by a crash keeps its own mode through `create`: set it.
    file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE))?;
    if let Some(old) = &old {
        let group_bits = old.mode() & 0o060;
        let same_group = file.metadata()?.gid() == old.gid();
        // Only the owner (or root) may give a file a group: keep the old group's
        // permissions only when the new file has that group too.
        if same_group || fchown(&file, None, Some(old.gid())).is_ok() {
            file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE | group_bits))?;
        }
    }
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(parent(path))
}

/// Creates directory `dir` (and its missing parents) with mode 0700; an existing one is
/// left as it is (an operator may have made it).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Makes `path` safe for another library (SQLite) to open: created empty with mode 0600 if
/// it does not exist (SQLite then gives its `-wal` and `-shm` files the same mode), and
/// stripped of others' permissions if it does, as are its `companions` (file names beside
/// it, like `billing.db-wal`) that exist. Returns the files whose mode it narrowed.
pub fn prepare_private_file(path: &Path, companions: &[&str]) -> io::Result<Vec<PathBuf>> {
    let mut narrowed = Vec::new();
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
    {
        Ok(file) => {
            file.sync_all()?;
            sync_dir(parent(path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if narrow(path)? {
                narrowed.push(path.to_path_buf());
            }
        }
        Err(e) => return Err(e),
    }
    for companion in companions {
        let other = parent(path).join(companion);
        match narrow(&other) {
            Ok(true) => narrowed.push(other),
            Ok(false) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(narrowed)
}

/// Takes the others' permissions off `path`; whether it had any.
fn narrow(path: &Path) -> io::Result<bool> {
    let mode = std::fs::metadata(path)?.mode();
    if mode & OTHERS == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode & 0o7770))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_file_is_written_whole_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(mode(&path), 0o600);
        assert!(!temporary(&path).exists(), "nothing left beside it");
    }

    #[test]
    fn a_replaced_file_loses_the_others_permissions_and_keeps_its_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o640, "group read kept, others' taken off");
        std::fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        write_atomic(&path, b"newer").unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_temporary_file_left_by_a_crash_does_not_lend_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        let tmp = temporary(&path);
        std::fs::write(&tmp, b"half written, long ago").unwrap();
        std::fs::set_permissions(&tmp, Permissions::from_mode(0o666)).unwrap();
        write_atomic(&path, b"whole").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_store_is_created_0600_and_an_old_world_readable_one_is_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data/sub");
        create_private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        let db = data.join("billing.db");
        assert!(prepare_private_file(&db, &["billing.db-wal"])
            .unwrap()
            .is_empty());
        assert_eq!(mode(&db), 0o600);
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);

        for f in [&db, &data.join("billing.db-wal")] {
            std::fs::write(f, b"x").unwrap();
            std::fs::set_permissions(f, Permissions::from_mode(0o644)).unwrap();
        }
        let narrowed = prepare_private_file(&db, &["billing.db-wal", "billing.db-shm"]).unwrap();
        assert_eq!(narrowed.len(), 2, "{narrowed:?}");
        assert_eq!(mode(&db), 0o640);
        assert_eq!(mode(&data.join("billing.db-wal")), 0o640);
        assert_eq!(std::fs::read(&db).unwrap(), b"x", "content untouched");
    }
}

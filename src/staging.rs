//! Folders written in a hidden staging folder beside their destination and renamed into place,
//! so a kill or a failure at any moment leaves the destination complete (old or new) or absent.
//! Used by training checkpoints and by `lorafold merge`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A staging folder that becomes its destination on [`Staged::commit`]; dropped uncommitted, it
/// is removed (a failed write leaves nothing behind).
pub struct Staged {
    tmp: PathBuf,
    committed: bool,
}

/// The destination's previous content, moved aside by [`Staged::commit`]; [`Replaced::discard`]
/// deletes it.
#[must_use]
pub struct Replaced(Option<PathBuf>);

impl Staged {
    /// Create the staging folder `tmp`, removing a stale one left by an earlier attempt.
    pub fn create(tmp: PathBuf) -> Result<Staged> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Staged { tmp, committed: false })
    }

    /// Where the content is written.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Fsync the staging folder and rename it to `dest`. An existing `dest` is first renamed to
    /// `trash` (a rename is atomic, deleting file by file is not) and put back if the final
    /// rename fails; the parent folder is fsynced once `dest` is in place.
    pub fn commit(mut self, dest: &Path, trash: &Path) -> Result<Replaced> {
        sync_dir(&self.tmp);
        let replaced = if dest.symlink_metadata().is_ok() {
            if trash.symlink_metadata().is_ok() {
                remove_any(trash)?;
            }
            std::fs::rename(dest, trash).map_err(|e| Error::io(dest, e))?;
            Some(trash.to_path_buf())
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.tmp, dest) {
            if let Some(trash) = &replaced {
                let _ = std::fs::rename(trash, dest);
            }
            return Err(Error::io(dest, e));
        }
        self.committed = true;
        if let Some(parent) = dest.parent() {
            sync_dir(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            });
        }
        Ok(Replaced(replaced))
    }
}

impl Replaced {
    /// Delete what the commit replaced, if anything.
    pub fn discard(self) -> Result<()> {
        match self.0 {
            Some(p) => remove_any(&p),
            None => Ok(()),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Remove a folder with its content, or a file or symlink.
fn remove_any(p: &Path) -> Result<()> {
    let r = if p.is_dir() && !p.is_symlink() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    r.map_err(|e| Error::io(p, e))
}

/// Flush a folder's entries to disk (best effort: not every platform can open a folder).
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

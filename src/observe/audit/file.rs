//! The audit log's file: opened for appending without following a symlink,
//! created 0600, rotated by size to `.1`, `.2`, … (`keep` of them).
//!
//! Hand-written rather than `file-rotate` or `tracing-appender`: neither opens
//! with `O_NOFOLLOW` nor refuses a path that is not a regular file, and the audit
//! log must count exactly which lines did not reach the file, one write per line.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Where the writer thread puts each line: the rotating file, or a test's
/// stand-in (a full disk, a slow one).
pub trait AuditSink: Send {
  /// Appends one whole line (it ends with `\n`).
  fn append(&mut self, line: &[u8]) -> io::Result<()>;
  /// Appends whole lines (`batch` holds them back to back; `ends[i]` is where
  /// line `i` ends), trying each one, and calls `failed` once for every line
  /// that is not whole in the sink. One line at a time unless the sink can do better.
  fn append_lines(&mut self, batch: &[u8], ends: &[usize], failed: &mut dyn FnMut(&io::Error)) {
    let mut start = 0;
    for &end in ends {
      if let Err(error) = self.append(&batch[start..end]) {
        failed(&error);
      }
      start = end;
    }
  }
  /// Puts what was appended on disk, before the writer ends.
  fn close(&mut self) -> io::Result<()>;
}

/// The audit file and its rotated predecessors.
pub struct RotatingFile {
  path: PathBuf,
  max_bytes: u64,
  keep: u32,
  /// `None` after a rotation whose new file could not be opened: lines are
  /// dropped (and counted) until an open succeeds.
  file: Option<File>,
  size: u64,
  /// A write failed part-way: the file may end inside a line, so the next line
  /// starts on a line of its own.
  torn: bool,
}

impl RotatingFile {
  /// Opens `path` for appending (creating it 0600, and its directory 0700 when
  /// missing). Fails when `path` is a symlink, a directory or anything but a
  /// regular file, or cannot be written; the error says which.
  pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<Self> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
      create_private_dir(dir)?;
    }
    let file = open_append(path)?;
    let size = file.metadata()?.len();
    Ok(Self {
      path: path.to_owned(),
      max_bytes: max_bytes.max(1),
      keep,
      file: Some(file),
      size,
      torn: false,
    })
  }

  /// `<path>.<n>`.
  fn rotated(&self, n: u32) -> PathBuf {
    let mut name = OsString::from(self.path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
  }

  /// `.keep-1` → `.keep`, …, the file → `.1`, then a new file. A rename moves a
  /// symlink itself, never its target; the new file is opened as at start.
  fn rotate(&mut self) -> io::Result<()> {
    self.file = None;
    if self.keep == 0 {
      remove_if_present(&self.path)?;
    } else {
      for n in (1..self.keep).rev() {
        rename_if_present(&self.rotated(n), &self.rotated(n + 1))?;
      }
      rename_if_present(&self.path, &self.rotated(1))?;
    }
    self.reopen()
  }

  /// An open file with room for `length` more bytes (rotated when it has none
  /// and is not empty).
  fn make_room(&mut self, length: u64) -> io::Result<()> {
    if self.file.is_none() {
      self.reopen()?;
    }
    if self.size > 0 && self.size + length > self.max_bytes {
      self.rotate()?;
    }
    Ok(())
  }

  /// One write of whole lines. After a failure the file may end inside a line:
  /// `size` is re-read, and the next write starts on a line of its own.
  fn write_whole(&mut self, lines: &[u8]) -> io::Result<()> {
    let Some(file) = self.file.as_mut() else {
      return Err(io::Error::other("the audit file is not open"));
    };
    if self.torn {
      file.write_all(b"\n")?;
      self.size += 1;
      self.torn = false;
    }
    match file.write_all(lines) {
      Ok(()) => {
        self.size += lines.len() as u64;
        Ok(())
      }
      Err(error) => {
        self.torn = true;
        if let Ok(meta) = file.metadata() {
          self.size = meta.len();
        }
        Err(error)
      }
    }
  }

  fn reopen(&mut self) -> io::Result<()> {
    let file = open_append(&self.path)?;
    self.size = file.metadata()?.len();
    self.file = Some(file);
    self.torn = false;
    Ok(())
  }
}

impl AuditSink for RotatingFile {
  fn append(&mut self, line: &[u8]) -> io::Result<()> {
    self.make_room(line.len() as u64)?;
    self.write_whole(line)
  }

  /// As few writes as the rotation allows: the lines that fit before the next
  /// rotation go in one write (O_APPEND: whole lines, never interleaved). After
  /// a failed write, the lines whose bytes all landed count as written, and the
  /// next line is tried again as `append` would.
  fn append_lines(&mut self, batch: &[u8], ends: &[usize], failed: &mut dyn FnMut(&io::Error)) {
    let mut next = 0;
    while next < ends.len() {
      let start = if next == 0 { 0 } else { ends[next - 1] };
      let first = ends[next] - start;
      if let Err(error) = self.make_room(first as u64) {
        failed(&error);
        next += 1;
        continue;
      }
      // The lines that fit in this file (at least one: a line longer than
      // max_bytes gets a file of its own, as `append` gives it).
      let room = self.max_bytes.saturating_sub(self.size);
      let mut last = next + 1;
      while last < ends.len() && (ends[last] - start) as u64 <= room {
        last += 1;
      }
      let before = self.size;
      match self.write_whole(&batch[start..ends[last - 1]]) {
        Ok(()) => next = last,
        Err(error) => {
          let landed = self.size.saturating_sub(before) as usize;
          let whole = ends[next..last]
            .iter()
            .take_while(|&&end| end - start <= landed)
            .count();
          if whole < last - next {
            // The line the write stopped in.
            failed(&error);
            next += whole + 1;
          } else {
            next = last;
          }
        }
      }
    }
  }

  fn close(&mut self) -> io::Result<()> {
    match self.file.take() {
      Some(file) => file.sync_data(),
      None => Ok(()),
    }
  }
}

/// Opens `path` to append, without following a symlink, creating it 0600.
/// O_NONBLOCK so that a FIFO planted there cannot hang the open (it has no
/// effect on a regular file).
#[cfg(unix)]
fn open_append(path: &Path) -> io::Result<File> {
  use std::os::unix::fs::OpenOptionsExt;
  let file = OpenOptions::new()
    .append(true)
    .create(true)
    .mode(0o600)
    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
    .open(path)
    .map_err(|error| explain(path, error))?;
  check_regular(path, &file)?;
  Ok(file)
}

/// Windows: FILE_FLAG_OPEN_REPARSE_POINT opens a symlink itself rather than its
/// target, which the regular-file check then refuses. The file's access is the
/// directory's inherited ACL (there is no mode 0600 to give it).
#[cfg(windows)]
fn open_append(path: &Path) -> io::Result<File> {
  use std::os::windows::fs::OpenOptionsExt;
  const FILE_FLAG_OPEN_REPARSE_POINT: u32 = 0x0020_0000;
  let file = OpenOptions::new()
    .append(true)
    .create(true)
    .custom_flags(FILE_FLAG_OPEN_REPARSE_POINT)
    .open(path)
    .map_err(|error| explain(path, error))?;
  check_regular(path, &file)?;
  Ok(file)
}

/// Elsewhere: a symlink is refused by a look before the open, which a swap in
/// between could beat; the best std offers there.
#[cfg(not(any(unix, windows)))]
fn open_append(path: &Path) -> io::Result<File> {
  if fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_symlink()) {
    return Err(symlink_error(path));
  }
  let file = OpenOptions::new()
    .append(true)
    .create(true)
    .open(path)
    .map_err(|error| explain(path, error))?;
  check_regular(path, &file)?;
  Ok(file)
}

fn check_regular(path: &Path, file: &File) -> io::Result<()> {
  let meta = file.metadata()?;
  if meta.file_type().is_symlink() {
    return Err(symlink_error(path));
  }
  if !meta.is_file() {
    return Err(io::Error::other(format!(
      "{} is not a regular file",
      path.display()
    )));
  }
  Ok(())
}

fn symlink_error(path: &Path) -> io::Error {
  io::Error::other(format!(
    "{} is a symbolic link; the audit log never follows one",
    path.display()
  ))
}

/// The open's error in words an owner can act on.
fn explain(path: &Path, error: io::Error) -> io::Error {
  #[cfg(unix)]
  if error.raw_os_error() == Some(libc::ELOOP) {
    return symlink_error(path);
  }
  let what = match error.kind() {
    ErrorKind::IsADirectory => "is a directory".to_owned(),
    ErrorKind::PermissionDenied => "cannot be written (permission denied)".to_owned(),
    ErrorKind::NotFound => "is in a directory that does not exist".to_owned(),
    _ if path.is_dir() => "is a directory".to_owned(),
    _ => format!("cannot be opened: {error}"),
  };
  io::Error::new(error.kind(), format!("{} {what}", path.display()))
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
  crate::config::make_private_dir(dir).map_err(|error| {
    io::Error::new(
      error.kind(),
      format!("cannot create {}: {error}", dir.display()),
    )
  })
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
  match fs::rename(from, to) {
    Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
    other => other,
  }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
  match fs::remove_file(path) {
    Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
    other => other,
  }
}

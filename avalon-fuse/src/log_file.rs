//! The client's log file (`-o log=FILE`), reopened on SIGHUP so that
//! logrotate can move it away: lines written after the signal go to a new
//! file at the same path.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing_subscriber::fmt::MakeWriter;

/// A log file that can be reopened at its path; clones share it.
#[derive(Clone, Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    /// Opens (creates, appends to) the file at `path`.
    pub fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(open(path)?)),
        })
    }

    /// Opens the path again: a file moved away is left to its mover.
    /// On failure the old file is kept.
    pub fn reopen(&self) -> io::Result<()> {
        let f = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = f;
        Ok(())
    }

    /// The path it writes to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One log line's hold on the file.
pub struct Line<'a>(MutexGuard<'a, File>);

impl io::Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a> MakeWriter<'a> for LogFile {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self.file.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reopen_writes_to_a_new_file_after_a_move() {
        let dir = std::env::temp_dir().join(format!("avalon-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.log");
        let log = LogFile::open(&path).unwrap();
        writeln!(log.make_writer(), "before").unwrap();
        let moved = dir.join("client.log.1");
        std::fs::rename(&path, &moved).unwrap();
        writeln!(log.make_writer(), "still old").unwrap();
        log.reopen().unwrap();
        writeln!(log.make_writer(), "after").unwrap();
        assert_eq!(
            std::fs::read_to_string(&moved).unwrap(),
            "before\nstill old\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

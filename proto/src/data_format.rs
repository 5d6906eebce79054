//! The format version of a daemon's data directory, kept in its
//! `avalon-format` file, so that a release never misreads a directory that
//! a newer one wrote in a format it does not know (a downgrade after a
//! format change): it refuses to start and says which release it needs.
//!
//! A directory without the file was written before formats were versioned:
//! format 1, which is what this release writes (the file is then created).
//! A release that changes a format bumps its daemon's current format and
//! converts older directories when it opens them.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the format file inside a data directory.
pub const FORMAT_FILE: &str = "avalon-format";

/// The current data-directory format of the MDS (raft log, snapshot).
pub const MDS_FORMAT: u32 = 1;

/// The current data-directory format of the OSD (chunk layout; each
/// sidecar also carries its own format).
pub const OSD_FORMAT: u32 = 1;

/// Why a data directory's format cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Written by a newer release in a format this one does not know.
    #[error(
        "{path} is in {kind} data format {found}, this release (avalon {release}) reads formats \
         up to {known}: run the newer release that wrote it"
    )]
    TooNew {
        path: PathBuf,
        kind: String,
        found: u32,
        known: u32,
        release: &'static str,
    },
    /// The file exists but says nothing this release understands.
    #[error("{path}: unreadable data format file ({detail})")]
    Unreadable { path: PathBuf, detail: String },
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks (and on first use records) the format of `dir` for daemon `kind`
/// ("mds", "osd"), whose current format is `current`. Returns the format
/// found (the caller converts an older one, then calls [`record`]).
pub fn check(dir: &Path, kind: &str, current: u32) -> Result<u32, FormatError> {
    let path = dir.join(FORMAT_FILE);
    let io = |source| FormatError::Io {
        path: path.clone(),
        source,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            record(dir, kind, current)?;
            return Ok(current);
        }
        Err(e) => return Err(io(e)),
    };
    let found = parse(&text, kind).ok_or_else(|| FormatError::Unreadable {
        path: path.clone(),
        detail: format!("expected \"avalon-{kind} data format N\""),
    })?;
    if found > current {
        return Err(FormatError::TooNew {
            path,
            kind: format!("avalon-{kind}"),
            found,
            known: current,
            release: crate::version::RELEASE,
        });
    }
    Ok(found)
}

/// Writes the format file of `dir` atomically and durably.
pub fn record(dir: &Path, kind: &str, format: u32) -> Result<(), FormatError> {
    let path = dir.join(FORMAT_FILE);
    let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
    let io = |source| FormatError::Io {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(format!("avalon-{kind} data format {format}\n").as_bytes())
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

fn parse(text: &str, kind: &str) -> Option<u32> {
    text.trim()
        .strip_prefix(&format!("avalon-{kind} data format "))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "avalon-format-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn an_unversioned_dir_is_recorded_as_current() {
        let d = tmp();
        assert_eq!(check(&d, "osd", 1).expect("ok"), 1);
        let t = std::fs::read_to_string(d.join(FORMAT_FILE)).expect("written");
        assert_eq!(t, "avalon-osd data format 1\n");
        assert_eq!(check(&d, "osd", 1).expect("again"), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_newer_format_is_refused_and_an_older_one_returned() {
        let d = tmp();
        record(&d, "mds", 3).expect("record");
        let e = check(&d, "mds", 2).expect_err("too new");
        let m = e.to_string();
        assert!(m.contains("avalon-mds data format 3"), "{m}");
        assert!(m.contains("up to 2"), "{m}");
        assert_eq!(check(&d, "mds", 4).expect("older"), 3);
        std::fs::write(d.join(FORMAT_FILE), "junk").expect("write");
        assert!(matches!(
            check(&d, "mds", 4),
            Err(FormatError::Unreadable { .. })
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! Parsing of the mount source `host:port[,host:port...][:/sub/dir]`.

/// A parsed mount source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSource {
    /// MDS addresses, `host:port` each.
    pub mds: Vec<String>,
    /// Subdirectory of the filesystem to mount (bytes, absolute, `/` = root).
    pub subdir: Vec<u8>,
}

/// Parses `SOURCE`. The subdirectory part starts at the first `:/`.
pub fn parse(source: &str) -> Result<MountSource, String> {
    let (addrs, subdir) = match source.find(":/") {
        Some(i) => (&source[..i], &source[i + 1..]),
        None => (source, "/"),
    };
    let mut mds = Vec::new();
    for a in addrs.split(',').filter(|a| !a.is_empty()) {
        let (host, port) = a
            .rsplit_once(':')
            .ok_or_else(|| format!("MDS address {a:?} has no port (want host:port)"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("bad MDS address {a:?} (want host:port)"));
        }
        mds.push(a.to_string());
    }
    if mds.is_empty() {
        return Err(format!(
            "mount source {source:?} names no MDS address (want host:port[,host:port...][:/dir])"
        ));
    }
    if subdir.split('/').any(|c| c == "..") {
        return Err(format!(
            "mount source subdirectory {subdir:?} may not contain '..'"
        ));
    }
    Ok(MountSource {
        mds,
        subdir: subdir.as_bytes().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let s = parse("127.0.0.1:7100,127.0.0.1:7101:/").unwrap();
        assert_eq!(s.mds, vec!["127.0.0.1:7100", "127.0.0.1:7101"]);
        assert_eq!(s.subdir, b"/");
        let s = parse("mds1:7100:/a/b").unwrap();
        assert_eq!(s.mds, vec!["mds1:7100"]);
        assert_eq!(s.subdir, b"/a/b");
        assert_eq!(parse("h:1").unwrap().subdir, b"/");
        assert!(parse("").is_err());
        assert!(parse("nohost").is_err());
        assert!(parse("h:notaport").is_err());
        assert!(parse("h:1:/../x").is_err());
    }
}

//! Section-8 manual pages of the daemons and the mount helper, made from
//! their clap definitions so the page never disagrees with `--help`.
//! `./dev package` runs each binary as `BIN --write-man DIR`.

use std::path::Path;

/// The hidden argument that asks a binary for its manual page.
const FLAG: &str = "--write-man";

/// When the command line is exactly `--write-man DIR`, writes DIR/NAME.8
/// from `cmd` and returns the exit status; otherwise `None` and the binary
/// parses its arguments as usual. Checked before clap so that binaries
/// with required arguments (the mount helper) answer it too.
pub fn write_if_asked(cmd: clap::Command) -> Option<u8> {
    let mut args = std::env::args_os().skip(1);
    let (flag, dir) = (args.next()?, args.next()?);
    if flag != FLAG || args.next().is_some() {
        return None;
    }
    let name = cmd.get_name().to_string();
    Some(match write(cmd, Path::new(&dir)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{name}: writing the manual page into {dir:?}: {e}");
            1
        }
    })
}

/// Writes DIR/NAME.8 (section 8: system administration commands).
pub fn write(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.8", cmd.get_name()));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).section("8").render(&mut out)?;
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_the_command_and_its_options() {
        let cmd = clap::Command::new("avalon-test")
            .about("A test daemon")
            .arg(
                clap::Arg::new("listen")
                    .long("listen")
                    .help("Listen address"),
            );
        let dir = std::env::temp_dir().join(format!("avalon-man-{}", std::process::id()));
        write(cmd, &dir).unwrap();
        let page = std::fs::read_to_string(dir.join("avalon-test.8")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(page.contains(".TH avalon-test 8"), "{page}");
        assert!(page.contains("listen"), "{page}");
        assert!(page.contains("A test daemon"), "{page}");
    }
}

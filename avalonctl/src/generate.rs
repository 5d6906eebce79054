//! Man pages (clap_mangen) and shell completions (clap_complete) made from
//! the command-line definition itself, so they never disagree with
//! `--help`; `./dev package` runs the hidden `avalonctl generate DIR`.

use clap_complete::Shell;
use std::path::Path;

/// Writes DIR/man/avalonctl.1 (and one page per subcommand,
/// avalonctl-status.1 ...), DIR/completions/avalonctl.bash and
/// DIR/completions/_avalonctl (zsh).
pub fn write_all(mut cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // Hidden commands (this one) stay out of the manuals.
    cmd.build();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    // clap's implicit `help` subcommands would get pages of their own
    // (avalonctl-help-status.1 ...): they repeat the real ones.
    for entry in std::fs::read_dir(&man)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.contains("-help") {
            std::fs::remove_file(&path)?;
        }
    }
    for shell in [Shell::Bash, Shell::Zsh] {
        clap_complete::generate_to(shell, &mut cmd, "avalonctl", &completions)?;
    }
    Ok(())
}

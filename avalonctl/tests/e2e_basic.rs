//! Through a real mount of a real 3-MDS, 3-OSD cluster: files of several
//! sizes written with std::fs and with cp, read back identical, listed,
//! renamed, deleted; directories; df. Then a full restart keeps every file.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

const SIZES: [(&str, usize); 4] = [
    ("empty", 0),
    ("one", 1),
    ("mib", 1 << 20),
    ("big", 100 << 20),
];

#[test]
fn files_dirs_rename_delete_df_and_restart() {
    let t = TestCluster::start(3, 3);
    let mnt = t.mnt();
    let src = tempfile::tempdir().unwrap();

    // Write with std::fs, and with cp from a local file.
    let mut digests = BTreeMap::new();
    for (i, (name, len)) in SIZES.iter().enumerate() {
        let d = data(*len, i as u64 + 1);
        std::fs::write(mnt.join(name), &d).unwrap();
        let local = src.path().join(name);
        std::fs::write(&local, &d).unwrap();
        run(Command::new("cp")
            .arg(&local)
            .arg(mnt.join(format!("{name}.cp"))));
        digests.insert(name.to_string(), (sha(&d), *len as u64));
    }

    // Read back byte-identical, sizes right, both copies.
    for (name, (dg, len)) in &digests {
        for f in [name.clone(), format!("{name}.cp")] {
            let p = mnt.join(&f);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), *len, "size of {f}");
            assert_eq!(&sha_file(&p), dg, "content of {f}");
        }
        // cp back out of the mount too.
        let out = src.path().join(format!("{name}.back"));
        run(Command::new("cp").arg(mnt.join(name)).arg(&out));
        assert_eq!(&sha_file(&out), dg);
    }

    // Listing: every file with its size, via read_dir and ls -l.
    let listed: BTreeMap<String, u64> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    for (name, (_, len)) in &digests {
        assert_eq!(listed.get(name), Some(len), "listing has {name}");
        assert_eq!(listed.get(&format!("{name}.cp")), Some(len));
    }
    let ls = run(Command::new("ls").arg("-l").arg(&mnt));
    assert!(
        ls.lines()
            .any(|l| l.contains(&(100u64 << 20).to_string()) && l.ends_with(" big")),
        "ls -l:\n{ls}"
    );

    // Directories: nested mkdir, files inside, non-empty rmdir fails, rmdir.
    let d = mnt.join("d1/d2/d3");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f"), b"nested").unwrap();
    assert_eq!(std::fs::read(d.join("f")).unwrap(), b"nested");
    let e = std::fs::remove_dir(mnt.join("d1/d2")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    assert_eq!(std::fs::metadata(mnt.join("d1")).unwrap().nlink(), 3);
    run(Command::new("mkdir").arg(mnt.join("d1/made-by-mkdir")));
    run(Command::new("rm").arg("-r").arg(mnt.join("d1/d2")));
    assert!(!mnt.join("d1/d2").exists());

    // Rename: within a dir, across dirs, over an existing file; mv binary.
    std::fs::rename(mnt.join("one"), mnt.join("one.renamed")).unwrap();
    assert!(!mnt.join("one").exists());
    assert_eq!(&sha_file(&mnt.join("one.renamed")), &digests["one"].0);
    std::fs::rename(mnt.join("mib"), mnt.join("d1/mib")).unwrap();
    assert_eq!(&sha_file(&mnt.join("d1/mib")), &digests["mib"].0);
    std::fs::rename(mnt.join("mib.cp"), mnt.join("one.renamed")).unwrap();
    assert_eq!(&sha_file(&mnt.join("one.renamed")), &digests["mib"].0);
    run(Command::new("mv")
        .arg(mnt.join("d1/mib"))
        .arg(mnt.join("mib.moved")));
    assert_eq!(&sha_file(&mnt.join("mib.moved")), &digests["mib"].0);

    // Delete.
    std::fs::remove_file(mnt.join("empty.cp")).unwrap();
    run(Command::new("rm").arg(mnt.join("one.cp")));
    assert!(!mnt.join("empty.cp").exists() && !mnt.join("one.cp").exists());
    let e = std::fs::remove_file(mnt.join("no-such-file")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));

    // Overwrite and truncate keep sizes and content exact.
    std::fs::write(mnt.join("big.cp"), b"short now").unwrap();
    let back = std::fs::read(mnt.join("big.cp")).unwrap();
    assert_eq!(back.len(), 9, "size after overwrite with O_TRUNC");
    assert!(back == b"short now");

    // df / statfs answer with the OSDs' capacity.
    let df = run(Command::new("df").arg("-P").arg(&mnt));
    let line = df.lines().nth(1).expect("df line");
    let total_kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(total_kb > 0, "df: {df}");
    let vfs = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert!(vfs.blocks() > 0 && vfs.blocks_free() <= vfs.blocks());
    assert!(vfs.name_max() >= 255);
}

#[test]
fn restart_of_the_whole_cluster_keeps_every_file() {
    let mut t = TestCluster::start(3, 3);
    let mnt = t.mnt();
    let mut expect = BTreeMap::new();
    std::fs::create_dir_all(mnt.join("a/b")).unwrap();
    for (i, len) in [0usize, 1, 4095, 4 << 20, (9 << 20) + 3]
        .into_iter()
        .enumerate()
    {
        let name = format!("a/b/f{i}");
        let d = data(len, 100 + i as u64);
        std::fs::write(mnt.join(&name), &d).unwrap();
        expect.insert(name, sha(&d));
    }
    std::os::unix::fs::symlink("b/f1", mnt.join("a/link")).unwrap();
    std::fs::rename(mnt.join("a/b/f0"), mnt.join("a/f0-moved")).unwrap();
    let moved = expect.remove("a/b/f0").unwrap();
    expect.insert("a/f0-moved".into(), moved);

    t.restart();
    let mnt = t.mnt();
    for (name, dg) in &expect {
        assert_eq!(&sha_file(&mnt.join(name)), dg, "{name} after restart");
    }
    assert_eq!(
        std::fs::read_link(mnt.join("a/link")).unwrap().to_str(),
        Some("b/f1")
    );
    assert_eq!(std::fs::read(mnt.join("a/link")).unwrap(), data(1, 101));
    let names: Vec<String> = std::fs::read_dir(mnt.join("a/b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    // And it keeps working after the restart.
    std::fs::write(mnt.join("after"), b"x").unwrap();
    assert_eq!(std::fs::read(mnt.join("after")).unwrap(), b"x");
}

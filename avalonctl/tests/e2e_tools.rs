//! Real tools on the mount: git, tar, sqlite (WAL, two writer processes),
//! rsync -a, make + cc.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn sh(dir: &Path, script: &str) -> String {
    run(Command::new("sh").arg("-ec").arg(script).current_dir(dir))
}

#[test]
fn git_tar_sqlite_rsync_make_on_the_mount() {
    let tc = TestCluster::start(1, 3);
    let m = tc.mnt();

    // git on a few hundred files.
    let repo = m.join("repo");
    std::fs::create_dir(&repo).unwrap();
    for d in 0..10 {
        std::fs::create_dir(repo.join(format!("d{d}"))).unwrap();
        for f in 0..30 {
            std::fs::write(
                repo.join(format!("d{d}/f{f}.txt")),
                data(500 + f * 37, (d * 100 + f) as u64),
            )
            .unwrap();
        }
    }
    sh(
        &repo,
        "git init -q . && git config user.email t@e && git config user.name t \
         && git add -A && git commit -qm first && echo change >> d3/f7.txt \
         && git commit -qam second && git status --porcelain > ../status.txt \
         && git log --oneline | wc -l > ../log.txt && git fsck --no-progress 2>&1",
    );
    assert_eq!(std::fs::read_to_string(m.join("status.txt")).unwrap(), "");
    assert_eq!(
        std::fs::read_to_string(m.join("log.txt")).unwrap().trim(),
        "2"
    );

    // tar of a real tree in and out, identical checksums.
    let src = Path::new("/usr/include/linux");
    let tarball = tc.dir.path().join("t.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(src)
        .arg("-cf")
        .arg(&tarball)
        .arg("."));
    std::fs::create_dir(m.join("untar")).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(m.join("untar"))
        .arg("-xf")
        .arg(&tarball));
    let sums = |d: &Path| sh(d, "find . -type f -print0 | sort -z | xargs -0 sha256sum");
    assert_eq!(sums(src), sums(&m.join("untar")));
    let back = tc.dir.path().join("back.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(m.join("untar"))
        .arg("-cf")
        .arg(&back)
        .arg("."));
    let out = tc.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&out)
        .arg("-xf")
        .arg(&back));
    assert_eq!(sums(src), sums(&out));

    // sqlite in WAL mode with two concurrent writer processes.
    let db = m.join("db.sqlite");
    let writer = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=60)
c.execute('pragma journal_mode=wal')
c.execute('create table if not exists t (w int, i int)')
c.commit()
for i in range(200):
    c.execute('insert into t values (?, ?)', (int(sys.argv[2]), i))
    c.commit()
"#;
    let init = Command::new("python3")
        .args(["-c", writer])
        .arg(&db)
        .arg("0")
        .status()
        .unwrap();
    assert!(init.success());
    let kids: Vec<_> = (1..=2)
        .map(|w| {
            Command::new("python3")
                .args(["-c", writer])
                .arg(&db)
                .arg(w.to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success(), "sqlite writer failed");
    }
    let q = run(Command::new("sqlite3").arg(&db).arg(
        "pragma journal_mode; select count(*), count(distinct w) from t; pragma integrity_check;",
    ));
    assert_eq!(q.trim(), "wal\n600|3\nok", "sqlite: {q}");

    // rsync -a keeps times, modes, links and xattrs.
    let rs = tc.dir.path().join("rsrc");
    std::fs::create_dir(&rs).unwrap();
    sh(
        &rs,
        "echo a > a && chmod 640 a && touch -d 2001-02-03 a && mkdir sub && echo b > sub/b \
         && chmod 2750 sub && ln -s a sym && ln a hard && python3 -c \"import os; os.setxattr('a', 'user.k', b'v')\"",
    );
    run(Command::new("rsync")
        .args(["-aHAX"])
        .arg(format!("{}/", rs.display()))
        .arg(m.join("rdst")));
    let (s, d) = (rs.join("a"), m.join("rdst/a"));
    let (ms, md) = (
        std::fs::metadata(&s).unwrap(),
        std::fs::metadata(&d).unwrap(),
    );
    assert_eq!((ms.mode(), ms.mtime()), (md.mode(), md.mtime()));
    assert_eq!(
        std::fs::metadata(m.join("rdst/sub")).unwrap().mode() & 0o7777,
        0o2750
    );
    assert_eq!(
        std::fs::read_link(m.join("rdst/sym")).unwrap(),
        Path::new("a")
    );
    assert_eq!(
        md.ino(),
        std::fs::metadata(m.join("rdst/hard")).unwrap().ino()
    );
    assert!(
        std::fs::read(m.join("rdst/a")).is_ok()
            && sh(
                &m.join("rdst"),
                "python3 -c \"import os; print(os.getxattr('a', 'user.k'))\""
            )
            .contains("b'v'")
    );
    // A second run transfers nothing.
    let again = run(Command::new("rsync")
        .args(["-aHAX", "--itemize-changes"])
        .arg(format!("{}/", rs.display()))
        .arg(m.join("rdst")));
    assert_eq!(again.trim(), "", "rsync found differences: {again}");

    // make + cc.
    let p = m.join("prog");
    std::fs::create_dir(&p).unwrap();
    std::fs::write(p.join("main.c"), "#include <stdio.h>\nint add(int,int);\nint main(void){printf(\"%d\\n\", add(40,2));return 0;}\n").unwrap();
    std::fs::write(p.join("add.c"), "int add(int a,int b){return a+b;}\n").unwrap();
    std::fs::write(
        p.join("Makefile"),
        "prog: main.o add.o\n\tcc -o $@ $^\n%.o: %.c\n\tcc -O1 -c $<\n",
    )
    .unwrap();
    sh(&p, "make -s && ./prog > out.txt && make -s -q prog");
    assert_eq!(std::fs::read_to_string(p.join("out.txt")).unwrap(), "42\n");
}

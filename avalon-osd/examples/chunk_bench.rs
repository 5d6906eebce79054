//! Write speed of the chunk store itself (no network): a sequential
//! stream of 1 MiB writes into 4 MiB chunks, then 4 KiB writes at random
//! offsets of a 256 MiB object, each phase ended by one fsync of the
//! object. Usage: `chunk_bench DIR [SEQ_MIB] [RANDOM_WRITES]`.

use avalon_osd::chunk_store::{ChunkStore, VersionMode};
use std::time::Instant;

const CS: u32 = 4 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: chunk_bench DIR [SEQ_MIB] [RANDOM_WRITES]")?;
    let seq_mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let random: u64 = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let _ = std::fs::remove_dir_all(&dir);
    let s = ChunkStore::open(&dir)?;
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();

    let t = Instant::now();
    for mib in 0..seq_mib {
        let (index, off) = (mib / 4, ((mib % 4) << 20) as u32);
        s.write(1, index, off, &buf, CS, VersionMode::Next, false)?;
    }
    s.sync_objects(&[1])?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "sequential: {seq_mib} MiB in {secs:.2} s = {:.0} MiB/s",
        seq_mib as f64 / secs
    );

    let span = 256u64 << 20;
    for index in 0..span / u64::from(CS) {
        s.write(2, index, 0, &buf[..1], CS, VersionMode::Next, false)?;
    }
    s.sync_objects(&[2])?;
    let mut x: u64 = 0x1234_5678;
    let t = Instant::now();
    for _ in 0..random {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pos = (x % (span / 4096)) * 4096;
        let (index, off) = (pos / u64::from(CS), (pos % u64::from(CS)) as u32);
        s.write(2, index, off, &buf[..4096], CS, VersionMode::Next, false)?;
    }
    s.sync_objects(&[2])?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "random 4 KiB: {random} writes in {secs:.2} s = {:.0} writes/s",
        random as f64 / secs
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

//! Builds the worker runtime (`python/snakepool_worker`, its `.py` files) into the
//! library: `runtime_files.rs` in `OUT_DIR` lists each file's path and bytes, and a
//! digest of them all names the directory they are written to at run time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let root =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo")).join("python");
    println!("cargo:rerun-if-changed=python/snakepool_worker");
    let mut files = Vec::new();
    collect(&root.join("snakepool_worker"), &mut files);
    files.sort();
    // FNV-1a over every path and content: any change gives a new directory.
    let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
    let mut listing = String::from("&[\n");
    for path in &files {
        let relative = path
            .strip_prefix(&root)
            .expect("under the runtime's root")
            .to_str()
            .expect("runtime paths are UTF-8");
        let bytes = std::fs::read(path).expect("readable runtime file");
        for byte in relative.bytes().chain(bytes.iter().copied()) {
            digest = (digest ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        writeln!(
            listing,
            "    ({relative:?}, include_bytes!({:?}).as_slice()),",
            path.display().to_string()
        )
        .expect("writing to a string");
    }
    listing.push(']');
    let generated = format!(
        "/// Each file of the worker runtime: its path under the runtime directory, and its bytes.\n\
         pub(crate) const FILES: &[(&str, &[u8])] = {listing};\n\
         /// A digest of [`FILES`].\n\
         pub(crate) const DIGEST: &str = \"{digest:016x}\";\n"
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    std::fs::write(out.join("runtime_files.rs"), generated).expect("writable OUT_DIR");
}

/// Every `.py` file under `dir`, recursively.
fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable runtime directory") {
        let path = entry.expect("readable directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "__pycache__") {
                collect(&path, files);
            }
        } else if path.extension().is_some_and(|e| e == "py") {
            files.push(path);
        }
    }
}

//! RocksDB linked from the system (`ROCKSDB_LIB_DIR`, which
//! `scripts/rocksdb-env.sh` sets where Debian's `librocksdb-dev` is 7.8 or
//! newer) instead of the copy the `rocksdb` crate compiles: an older library
//! may lack the C API's write buffer manager, whose destructor the crate's
//! `Options` still refers to. A stand-in is then compiled in; pgcdc never
//! makes a write buffer manager, so it is never called.

use std::path::{Path, PathBuf};

/// The C function the library must define for the crate to link.
const NEEDED: &str = "rocksdb_write_buffer_manager_destroy";

/// The stand-in: stops the process if it were ever called.
const STAND_IN: &str = "#include <stdlib.h>\n\
void rocksdb_write_buffer_manager_destroy(void *manager) { (void)manager; abort(); }\n";

fn main() {
    println!("cargo::rerun-if-env-changed=ROCKSDB_LIB_DIR");
    println!("cargo::rerun-if-env-changed=ROCKSDB_STATIC");
    let Some(dir) = std::env::var_os("ROCKSDB_LIB_DIR") else {
        return;
    };
    // The file librocksdb-sys links: the archive with ROCKSDB_STATIC, else the shared library.
    let name = if std::env::var_os("ROCKSDB_STATIC").is_some() {
        "librocksdb.a"
    } else {
        "librocksdb.so"
    };
    let lib = Path::new(&dir).join(name);
    println!("cargo::rerun-if-changed={}", lib.display());
    let Ok(bytes) = std::fs::read(&lib) else {
        return;
    };
    if bytes.windows(NEEDED.len()).any(|w| w == NEEDED.as_bytes()) {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = out.join("rocksdb_stand_in.c");
    std::fs::write(&source, STAND_IN).expect("write the stand-in's source");
    cc::Build::new().file(&source).compile("rocksdb_stand_in");
}

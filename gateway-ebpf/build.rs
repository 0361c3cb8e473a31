// Rebuild the programs when bpf-linker changes: cargo cannot express a
// dependency on a binary, so key the cache on where it is found.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`"),
    }
}

//! Embeds the shipped catalog (`templates/<id>/template.toml` at the
//! repository root) so `berth templates …` works without the source tree.
use std::fmt::Write;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries: Vec<(String, String)> = Vec::new();
    if let Ok(dirs) = std::fs::read_dir(&root) {
        for d in dirs.flatten() {
            let spec = d.path().join("template.toml");
            if spec.is_file() {
                println!("cargo:rerun-if-changed={}", spec.display());
                let id = d.file_name().to_string_lossy().to_string();
                let path = spec.canonicalize().unwrap_or(spec);
                entries.push((id, path.display().to_string()));
            }
        }
    }
    entries.sort();
    let mut out = String::from("pub(crate) const BUILTIN: &[(&str, &str)] = &[\n");
    for (id, path) in entries {
        let _ = writeln!(out, "    ({id:?}, include_str!({path:?})),");
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into())).join("builtin.rs");
    if let Err(e) = std::fs::write(&dest, out) {
        panic!("cannot write {}: {e}", dest.display());
    }
}

//! Writes the CRD YAML under crds/generated/ (default), or prints it with `--stdout`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let to_stdout = std::env::args().any(|a| a == "--stdout");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for crd in kubetune_crds::all_crds() {
        let yaml = kubetune_crds::crd_yaml(&crd)?;
        if to_stdout {
            println!("---\n{yaml}");
        } else {
            let path = dir.join(kubetune_crds::crd_file_name(&crd));
            std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
            std::fs::write(&path, yaml)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

//! kubetune-server: OpenAI-compatible inference. The engine arrives with its own issue;
//! until then the binary only reports its version.

fn main() {
    println!("kubetune-server {} (inference not built yet)", env!("CARGO_PKG_VERSION"));
}

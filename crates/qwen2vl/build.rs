//! With the `libjpeg` feature (on by default), compiles `csrc/jpeg_shim.c` against the system
//! libjpeg (Debian/Ubuntu: `libjpeg-dev`, i.e. `libjpeg62-turbo-dev` or `libjpeg-turbo8-dev`),
//! so JPEGs decode bit-for-bit as Pillow decodes them (see `processing/image.rs`).

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_shim.c");
    #[cfg(feature = "libjpeg")]
    {
        cc::Build::new()
            .file("csrc/jpeg_shim.c")
            .warnings(true)
            .compile("qwen2vl_jpeg_shim");
        println!("cargo:rustc-link-lib=jpeg");
    }
}

//! Small helpers shared by several modules: environment switches, progress bars, byte counts and
//! the Ctrl-C flag.

/// An environment variable read as a switch: `1`, `true`, `yes` or `on` (any case) turn it on.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// A progress bar of `len` steps drawn with `template` (indicatif's syntax), or a hidden one.
/// A template indicatif rejects falls back to its default bar rather than failing the job.
pub fn progress_bar(len: usize, template: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    let style =
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// A byte count for messages: `512 B`, `3.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The process's Ctrl-C flag. The first Ctrl-C sets it and prints `message` (the first caller's:
/// the handler is installed once); a second one while it is still set exits at once with 130.
/// Whoever handles the interrupt clears the flag to re-arm it.
pub fn install_ctrlc(message: &'static str) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let installed = ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting now");
                std::process::exit(130);
            }
            eprintln!("\n{message}");
        });
        if let Err(e) = installed {
            eprintln!("warning: cannot install the Ctrl-C handler: {e}");
        }
        flag
    })
    .clone()
}

/// Whether a Ctrl-C flag (from [`install_ctrlc`]) is set; no flag is never set.
pub fn is_set(flag: Option<&std::sync::Arc<std::sync::atomic::AtomicBool>>) -> bool {
    flag.is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
}

/// Clear a Ctrl-C flag once its interrupt was handled, re-arming it.
pub fn clear(flag: Option<&std::sync::Arc<std::sync::atomic::AtomicBool>>) {
    if let Some(f) = flag {
        f.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// FNV-1a, fed one word at a time (a byte is a word): the hash behind data fingerprints, the
/// ranks' agreement check and merge's random streams.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn eat(&mut self, x: u64) {
        self.0 ^= x;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn eat_bytes(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.eat(b as u64));
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

//! The one way the command line prints for people.
//!
//! Much of what the CLI shows was written by someone else: field names,
//! labels and record text from a dataset's importer, a file name given at
//! import, job and deployment names, settings. Printed raw, a control
//! character in any of it reaches the reader's terminal — an escape
//! sequence can clear the screen, hide or fake lines, retitle the window
//! or write the clipboard — and a bidirectional control makes text read
//! differently from what it is. So every line for people goes through
//! [`say!`] (or [`say_part!`] for a piece of a line), which shows each
//! control, bidirectional and invisible format character but newline and
//! tab as a visible `\u{…}` escape, as the console's pages do. JSON for
//! machines goes through [`json`] unchanged: serde_json already escapes
//! control characters inside strings, and the values must stay exact.
//! `clippy.toml` in this crate disallows `print!` and `println!`, so no
//! other way in remains.

use std::fmt::Arguments;
use std::io::Write as _;

/// Prints `args`, neutralized, and a newline when `newline`.
pub fn human(args: Arguments<'_>, newline: bool) {
    let text = args.to_string();
    let shown = cloister_host::text::neutralize(&text);
    let mut out = std::io::stdout().lock();
    let written = if newline {
        writeln!(out, "{shown}")
    } else {
        write!(out, "{shown}")
    };
    fail_like_println(written);
}

/// Prints one JSON document (or JSON Lines line) exactly as given.
pub fn json(text: &str) {
    fail_like_println(writeln!(std::io::stdout().lock(), "{text}"));
}

/// A closed pipe (`cloister … | head`) ends the program quietly with exit
/// status 141 (128 + SIGPIPE), as the binary's panic hook does for
/// `println!`; any other failure to write standard output (a full disk
/// behind a redirection) is an error, exit status 1: output is never
/// dropped silently.
fn fail_like_println(r: std::io::Result<()>) {
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}

/// `println!` for people: the line neutralized ([`human`]).
macro_rules! say {
    () => {
        $crate::output::human(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::output::human(format_args!($($arg)*), true)
    };
}

/// `print!` for people: a piece of a line, neutralized ([`human`]).
macro_rules! say_part {
    ($($arg:tt)*) => {
        $crate::output::human(format_args!($($arg)*), false)
    };
}

pub(crate) use {say, say_part};

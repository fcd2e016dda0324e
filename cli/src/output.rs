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
//! Messages for people on standard error (progress, warnings, the error
//! line) go the same way through [`tell!`] and [`tell_part!`]; a progress
//! line that redraws itself on a terminal uses [`redraw`] and
//! [`clear_line`], whose carriage return and erase sequence are the only
//! control characters the CLI writes itself. `clippy.toml` in this crate
//! disallows `print!`, `println!`, `eprint!` and `eprintln!`, so no other
//! way in remains.

use std::fmt::Arguments;
use std::io::Write as _;

/// Writes `before` (the CLI's own text, as is), then `args` neutralized,
/// then a newline when `newline`.
fn neutralized(
    out: &mut impl std::io::Write,
    before: &str,
    args: Arguments<'_>,
    newline: bool,
) -> std::io::Result<()> {
    let text = args.to_string();
    let shown = cloister_host::text::neutralize(&text);
    let end = if newline { "\n" } else { "" };
    write!(out, "{before}{shown}{end}")
}

/// Prints `args`, neutralized, and a newline when `newline`.
pub fn human(args: Arguments<'_>, newline: bool) {
    fail_like_println(neutralized(
        &mut std::io::stdout().lock(),
        "",
        args,
        newline,
    ));
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
            note(
                format_args!("error: cannot write to standard output: {e}"),
                true,
            );
            std::process::exit(1);
        }
    }
}

/// Writes `args`, neutralized, to standard error, and a newline when
/// `newline`. A message that cannot be written has nowhere else to go, so
/// a failure is ignored (as a message to a closed terminal is lost).
pub fn note(args: Arguments<'_>, newline: bool) {
    let _ = neutralized(&mut std::io::stderr().lock(), "", args, newline);
}

/// Redraws the terminal's current line of standard error with `args`,
/// neutralized: a carriage return, the text, and no newline (the next
/// [`redraw`] overwrites it; [`clear_line`] or a newline ends it).
pub fn redraw(args: Arguments<'_>) {
    let _ = neutralized(&mut std::io::stderr().lock(), "\r", args, false);
}

/// Erases the terminal's current line of standard error (a line
/// [`redraw`] left), so that the next message starts on a clean line.
pub fn clear_line() {
    let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
}

/// `eprintln!` for people: the line neutralized ([`note`]).
macro_rules! tell {
    () => {
        $crate::output::note(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::output::note(format_args!($($arg)*), true)
    };
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

pub(crate) use {say, say_part, tell};

fn main() -> std::process::ExitCode {
    clusterd::main_entry()
}

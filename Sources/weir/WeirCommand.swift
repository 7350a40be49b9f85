import ArgumentParser

struct WeirCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weir",
        abstract: "Weir: a programmable HTTP proxy and API gateway with Lua 5.4 plugins.",
        version: WeirVersion.string,
        subcommands: [RunCommand.self, ValidateCommand.self, ReloadCommand.self, VersionCommand.self, DemoUpstreamCommand.self]
    )
}

enum WeirVersion {
    static let string = "0.1.0"
}

struct VersionCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "version", abstract: "Print the version.")

    func run() {
        print("weir \(WeirVersion.string)")
    }
}

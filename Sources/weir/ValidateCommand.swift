import ArgumentParser
import Foundation
import WeirAdmin

struct ValidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "validate",
        abstract: "Check a config file; list every problem with its config path.",
        discussion: "Exit status: 0 when the config is valid, 1 otherwise."
    )

    @Option(name: .shortAndLong, help: "Path to the YAML config file.")
    var config: String

    func run() throws {
        let result = ConfigCheck.run(path: config)
        if result.isValid {
            print(result.message)
        } else {
            printError(result.message)
            throw ExitCode(result.exitCode)
        }
    }
}

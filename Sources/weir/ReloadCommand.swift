import ArgumentParser
import Foundation
import WeirAdmin
import WeirCore

struct ReloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload",
        abstract: "Ask a running gateway to reload its config and plugins (POST /reload on its admin listener).",
        discussion: """
            The admin address comes from --admin, or from the `admin.listen` of --config.
            Exit status: 0 when the new generation is serving; 1 when the reload failed
            (the old generation keeps serving; the reason is printed) or the gateway
            cannot be reached.
            """
    )

    @Option(name: .shortAndLong, help: "Config file of the running gateway (for its admin address).")
    var config: String?

    @Option(help: "Admin listener address (host:port), instead of reading --config.")
    var admin: String?

    @Option(help: "Seconds to wait for the reload to finish.")
    var timeout: Int = 60

    func validate() throws {
        if config == nil && admin == nil { throw ValidationError("give --admin host:port or --config FILE") }
        if let admin = admin, parseHostPort(admin) == nil {
            throw ValidationError("--admin must be host:port, e.g. 127.0.0.1:9901 (got \"\(admin)\")")
        }
        guard timeout >= 1 else { throw ValidationError("--timeout must be at least 1 second") }
    }

    func run() throws {
        let address: HostPort
        if let admin = admin {
            address = parseHostPort(admin)!
        } else {
            let check = ConfigCheck.run(path: config!)
            guard let loaded = check.config else {
                printError(check.message)
                throw ExitCode(1)
            }
            guard let adminConfig = loaded.admin else {
                printError("weir reload: \(config!) has no `admin` section, so there is no admin listener to ask")
                throw ExitCode(1)
            }
            address = adminConfig.listen
        }
        let response: AdminClient.Response
        do {
            response = try AdminClient.send(method: .POST, to: address, path: "/reload", timeout: .seconds(Int64(timeout)))
        } catch {
            printError("weir reload: \(error) (is weir running?)")
            throw ExitCode(1)
        }
        let body = response.body.trimmingCharacters(in: .whitespacesAndNewlines)
        switch response.status {
        case 200..<300:
            print(body.isEmpty ? "reloaded" : body)
        case 404:
            printError("weir reload: the gateway at \(address) has no /reload endpoint (hot reload is not available in that build)")
            throw ExitCode(1)
        default:
            printError("weir reload failed (HTTP \(response.status)): \(body)")
            throw ExitCode(1)
        }
    }
}

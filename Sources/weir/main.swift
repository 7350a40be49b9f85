import ArgumentParser
import WeirLua

struct Weir: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Weir: a programmable proxy.")
}
Weir.main()

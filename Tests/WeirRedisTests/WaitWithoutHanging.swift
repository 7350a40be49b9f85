import Foundation
import NIOCore
import XCTest

/// Waits for `future`, but fails the test instead of hanging forever if it
/// never completes (the property under test is "never hangs").
func waitWithoutHanging<T>(_ future: EventLoopFuture<T>, file: StaticString = #filePath,
                           line: UInt = #line) -> Result<T, Error>? {
    let done = DispatchSemaphore(value: 0)
    let box = ResultBox<T>()
    future.whenComplete { result in
        box.result = result
        done.signal()
    }
    guard done.wait(timeout: .now() + 15) == .success else {
        XCTFail("future did not complete within 15 s (hang)", file: file, line: line)
        return nil
    }
    return box.result
}

private final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}

// Debian's libnghttp2-dev: the HTTP/2 engine of downstream connections
// (Sources/WeirProxy/HTTP2/HTTP2DownstreamConnection.swift).
#include <nghttp2/nghttp2.h>

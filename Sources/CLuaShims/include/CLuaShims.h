#ifndef WEIR_CLUA_SHIMS_H
#define WEIR_CLUA_SHIMS_H
// C-side helpers for the Lua bridge. Lua raises errors and yields with
// longjmp; these trampolines make sure that only ever happens in C frames,
// after any Swift function has returned. See DESIGN.md "Lua bridging rules".
#include <lua5.4/lua.h>

/// The Lua version string this binary was built against, e.g. "Lua 5.4".
const char *weir_lua_version(void);

#endif

#include "CLuaShims.h"

const char *weir_lua_version(void) { return LUA_VERSION; }

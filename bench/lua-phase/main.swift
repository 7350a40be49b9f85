// Lua phase-cost micro-measure; filled in with the phase runner.
import WeirLua
print(luaVersion)

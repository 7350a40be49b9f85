local function names(what)
  return { type = "array", elements = { type = "string", min = 1 }, default = {}, description = what }
end
local function pairs_of(what)
  return { type = "map", values = { type = "string" }, default = {}, description = what }
end

-- One record per operation; each has headers and querystring.
local function operation(description, header_text, query_text, kind)
  local make = kind == "names" and names or pairs_of
  return { type = "record", default = {}, description = description, fields = {
    headers = make(header_text),
    querystring = make(query_text),
  } }
end

return { fields = {
  remove = operation("applied first: headers and query arguments removed", "header names removed", "query argument names removed", "names"),
  rename = operation("applied second: headers and query arguments renamed",
                     "old name: new name; the header keeps its value(s) under the new name (only if present)",
                     "old name: new name; the argument keeps its value(s) under the new name (only if present)"),
  replace = operation("applied third: values replaced where present",
                      "name: value; replaces the header's value(s) only if the header is present",
                      "name: value; replaces the argument's value(s) only if the argument is present"),
  add = operation("applied fourth: set where absent",
                  "name: value; sets the header only if it is absent",
                  "name: value; sets the argument only if it is absent"),
  append = operation("applied last: one more value each",
                     "name: value; adds one more line for the header (sets it when absent)",
                     "name: value; adds one more value for the argument (sets it when absent)"),
} }

local function names(what)
  return { type = "array", elements = { type = "string", min = 1 }, default = {}, description = what }
end
local function pairs_of(what)
  return { type = "map", values = { type = "string" }, default = {}, description = what }
end

-- JSON body field values: scalars (YAML maps and lists are not values here).
local json_value = { type = "one_of", one_of = { { type = "string" }, { type = "number" }, { type = "boolean" } } }

-- One record per operation; each has headers and querystring (and, except
-- append, json: body fields by dot-separated path).
local function operation(description, header_text, query_text, kind, json_text)
  local make = kind == "names" and names or pairs_of
  local fields = {
    headers = make(header_text),
    querystring = make(query_text),
  }
  if json_text then
    if kind == "names" then
      fields.json = names(json_text)
    elseif kind == "values" then
      fields.json = { type = "map", values = json_value, default = {}, description = json_text }
    else
      fields.json = pairs_of(json_text)
    end
  end
  return { type = "record", default = {}, description = description, fields = fields }
end

return { fields = {
  remove = operation("applied first: headers, query arguments and JSON body fields removed", "header names removed",
                     "query argument names removed", "names", "JSON body field paths removed (a.b = field b of object a)"),
  rename = operation("applied second: headers, query arguments and JSON body fields renamed",
                     "old name: new name; the header keeps its value(s) under the new name (only if present)",
                     "old name: new name; the argument keeps its value(s) under the new name (only if present)",
                     nil, "old path: new path; the field keeps its value under the new path (only if present)"),
  replace = operation("applied third: values replaced where present",
                      "name: value; replaces the header's value(s) only if the header is present",
                      "name: value; replaces the argument's value(s) only if the argument is present",
                      "values", "path: value (string, number, boolean); replaces the field's value only if present"),
  add = operation("applied fourth: set where absent",
                  "name: value; sets the header only if it is absent",
                  "name: value; sets the argument only if it is absent",
                  "values", "path: value (string, number, boolean); sets the field only if absent (missing parent objects are created)"),
  append = operation("applied last: one more value each",
                     "name: value; adds one more line for the header (sets it when absent)",
                     "name: value; adds one more value for the argument (sets it when absent)"),
  json_max_size = { type = "integer", default = 1048576, min = 1, max = 8388608,
                    description = "JSON body ops apply to bodies up to this many bytes; larger bodies (and non-JSON ones) pass unchanged" },
} }
